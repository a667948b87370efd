from qabox.cli import main

main()
