"""The core of each command, one module per verb (or group of verbs): each takes a
Context and the command's options, and returns its result as data (or raises a
QaboxError); printing it is the CLI's part (``qabox.cli``)."""
