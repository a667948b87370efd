"""qabox, as users run it, with another build of its host agent: the same code
behind a zipapp's shebang line, so another hash. The upgrade figure runs
`restart` with it and then with qabox's own agent, each handing over to the next."""

import sys

from qabox import remote
from qabox.agent_zip import hash_of

remote.AGENT_PYZ = b"#!/usr/bin/env python3\n" + remote.AGENT_PYZ
remote.AGENT_HASH = hash_of(remote.AGENT_PYZ)

from qabox.cli import app  # noqa: E402

app(sys.argv[1:], prog_name="qabox")
