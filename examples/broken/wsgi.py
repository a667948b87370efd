"""An app that cannot start: it fails at import time, like a real app missing
its configuration.  Used to check that qabox reports a failed deploy (and the
error below) instead of calling it healthy.  There is no qabox.toml here on
purpose, so the default entry "wsgi:app" is used; the import never gets that far.
"""

raise RuntimeError("missing setting DATABASE_URL")
