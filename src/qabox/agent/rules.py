"""Rules shared by qabox and the host: names, build members, requirements, app entries,
health codes, static directories, sshd.

qabox checks a build with these same functions before sending it, and the
host checks it again before extracting: one set of rules on both sides. Like
the whole agent, this keeps to python 3.6 (no walrus, no ``X | None``
evaluated at run time: such annotations are strings), and imports nothing
heavy: the client imports it too.
"""

import ast
import posixpath
import re
import shlex

from .protocol import Fail

# Names and ids become paths and key lines on the host: always matched whole
# (fullmatch: "$" alone would accept a trailing newline).
ENV_NAME = re.compile(r"[a-z0-9][a-z0-9_-]{0,31}")
SHA256 = re.compile(r"[0-9a-f]{64}")
RELEASE_ID = re.compile(r"\d{8}-\d{6}(-\d+)?")
HEALTH_PATH = re.compile(r"/[\x21-\x7e]*")  # fullmatch; printable, no spaces: pasted into a request line
CONFIG_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")  # fullmatch: a name any shell can export
DEFAULT_HEALTH_STATUS = "200-399"  # the HTTP codes that mean up: a 4xx (Django's ALLOWED_HOSTS) is not
WARMING_UP = (502, 503, 504)  # answers of an app still starting: waited out, unlike a steady 500
RELEASE_FILE = "release.json"  # qabox's record in each release: a build may not bring its own
QABOX_DIRS = ("wheels",)  # a release's names that are qabox's (besides RELEASE_FILE): never persisted
DEFAULT_PERSIST = ["instance"]  # Flask's instance folder
DEFAULT_MAX_BYTES = 2 * 1024**3
DEFAULT_MAX_MEMBERS = 50000
RELEASE_TIMEOUT = 300  # seconds the release hooks of a deploy may take, all together
HEADER_BYTES = 512  # each member's tar header, counted so that empty members are not free
NAME_MAX = 255  # bytes in one name of a path: Linux's limit
PATH_MAX = 3072  # bytes in a member's path or link: Linux's 4096 less room for the release's own path
LINK_HOPS = 40  # links one lookup may go through, as Linux's ELOOP limit
DIR, FILE = 0, 1  # kinds in the tree check_members builds; a link's entry is its target (a str)


def name_parts(name: str) -> list:
    """A member's path as its names: ``./a//b/`` is ``["a", "b"]``."""
    return [p for p in name.split("/") if p not in ("", ".")]


def shown(name: str) -> str:
    """A member's name for a one-line message: escaped, at most 100 characters."""
    text = name if name.isprintable() else repr(name)[1:-1]
    return text if len(text) <= 100 else text[:60] + "..." + text[-37:]


def too_long(path: str):
    """Why a path is longer than the host can create, or None."""
    raw = path.encode("utf-8", "surrogatepass")
    if len(raw) > PATH_MAX:
        return "longer than %d bytes: shorten it" % PATH_MAX
    if any(len(part) > NAME_MAX for part in raw.split(b"/")):
        return "a name in it is longer than %d bytes, the host's limit: shorten it" % NAME_MAX
    return None


def persist_problem(path):
    """Why a path of ``[app] persist`` may not become a link into the env's data dir, or None."""
    if not isinstance(path, str) or not path:
        return "not a path"
    parts = name_parts(path)
    if path.startswith("/") or "\\" in path or re.match(r"^[A-Za-z]:", path):
        return "an absolute path: name a path inside the release"
    if ".." in parts:
        return "a path with '..': name a path inside the release"
    if not parts:
        return "the release itself: name a path inside it"
    if "\x00" in path or not path.isprintable():
        return "a NUL or a control character in it"
    if parts[0] == RELEASE_FILE or parts[0] in QABOX_DIRS or parts[0].startswith(".restore"):
        return "qabox's own (%s): name another path" % parts[0]
    return too_long(path)


def persist_problems(paths) -> list:
    """What is wrong with a build's ``[app] persist``, each as ``"'path': why"``."""
    if not isinstance(paths, list):
        return ["%r is not a list of paths (like [\"instance\", \"media\"])" % (paths,)]
    problems = ["%r: %s" % (p, persist_problem(p)) for p in paths if persist_problem(p)]
    if problems:
        return problems
    parts = [name_parts(p) for p in paths]
    return ["%r: inside %r, which is persisted already" % (p, q) for p, a in zip(paths, parts)
            for q, b in zip(paths, parts) if a != b and a[:len(b)] == b]


def member_problem(member):
    """Why this tar member, taken alone, may not be extracted into a release, or None."""
    name = member.name
    parts = name_parts(name)
    if name.startswith("/") or re.match(r"^[A-Za-z]:", name):
        return "absolute path"
    if ".." in name_parts(name.replace("\\", "/")):
        return "path with '..'"
    if "\x00" in name:
        return "NUL in name"
    if not parts and not member.isdir():
        return "empty name"
    long_name = too_long(name)
    if long_name:
        return "path " + long_name
    if parts[:1] == [RELEASE_FILE]:
        return "qabox writes each release's own %s there: rename this member" % RELEASE_FILE
    if member.isdev() or member.isfifo():
        return "device or fifo"
    if member.issym() or member.islnk():
        target = member.linkname
        if target.startswith("/"):
            return "link to an absolute path"
        if not target or "\x00" in target:
            return "link with an empty target or a NUL in it"
        long_target = too_long(target)
        if long_target:
            return "link target " + long_target
    elif not (member.isfile() or member.isdir()):
        return "unsupported member type"
    return None


def place(tree: dict, member):
    """Add a member to the tree the build makes, or say why it cannot go there.

    A member is judged by where it would land, not by its name alone: nothing
    may be written through a link an earlier member made (``a/b -> ..`` then
    ``a/b/f``), and nothing may replace an earlier member (tar allows the same
    path twice; a link replacing a directory is the classic escape). A
    directory named again is fine.
    """
    parts = tuple(name_parts(member.name))
    for i in range(1, len(parts)):
        node = tree.get(parts[:i])
        if isinstance(node, str):
            return "written through the link %s made by an earlier member" % shown("/".join(parts[:i]))
        if node == FILE:
            return "inside %s, which is a file of the build" % shown("/".join(parts[:i]))
    if parts in tree and not (tree[parts] == DIR and member.isdir()):
        return "an earlier member has the same path: keep only one"
    if member.islnk() and tree.get(tuple(name_parts(member.linkname))) != FILE:
        return "hardlink to %s, which is not a file earlier in the build" % shown(member.linkname)
    for i in range(1, len(parts)):
        tree.setdefault(parts[:i], DIR)
    tree[parts] = member.linkname if member.issym() else DIR if member.isdir() else FILE
    return None


def resolve(tree: dict, base: tuple, target: str):
    """The path a link in directory ``base`` leads to, following the build's
    own links like the kernel would (names not in the build count as
    directories), or a reason it leads nowhere safe."""
    path = list(base)
    todo = target.split("/")[::-1]
    hops = 0
    while todo:
        part = todo.pop()
        if part in ("", "."):
            continue
        if part == "..":
            if not path:
                return "leads outside the build"
            path.pop()
            continue
        path.append(part)
        node = tree.get(tuple(path))
        if isinstance(node, str):
            hops += 1
            if hops > LINK_HOPS:
                return "goes through more than %d links (a loop?)" % LINK_HOPS
            path.pop()
            todo.extend(node.split("/")[::-1])
    return tuple(path)


def check_members(members, max_bytes: int = DEFAULT_MAX_BYTES,
                  max_members: int = DEFAULT_MAX_MEMBERS) -> list:
    """All problems of a build's members as ``"name: reason"`` strings."""
    problems = []
    tree = {(): DIR}
    links = []
    total = 0
    for member in members:
        reason = member_problem(member) or place(tree, member)
        if reason:
            problems.append("%s: %s" % (shown(member.name), reason))
        elif member.issym():
            links.append(member)
        total += HEADER_BYTES + (max(member.size, 0) if member.isfile() else 0)
    # Links are judged in the finished tree: a later member can change where one leads.
    for member in links:
        parts = tuple(name_parts(member.name))
        where = resolve(tree, parts[:-1], member.linkname)
        if isinstance(where, str):
            problems.append("%s: link to %s %s" % (shown(member.name), shown(member.linkname), where))
    if len(members) > max_members:
        problems.append("more than %d members, the limit: ship fewer files or raise max_build_members"
                        " in the host's hosts file" % max_members)
    if total > max_bytes:
        problems.append(
            "extracted size %d MB exceeds the limit of %d MB: make the build smaller or raise"
            " max_build_mb in the host's hosts file" % (total // 2**20, max_bytes // 2**20)
        )
    return problems


SAFE_OPTIONS = ("--pre", "--prefer-binary", "--only-binary", "--require-hashes")  # change nothing pip reaches


def requirements_problems(read, name: str = "requirements.txt", seen: set = None) -> list:
    """Lines of a build's requirements (and the files they include) that would
    make pip reach beyond the build or run code at deploy time, as
    ``"file:line: why"``. ``read(path)`` gives a file of the build (a path
    relative to its root) as text, or None when there is none.

    Only named requirements are allowed: no URLs, paths, editables, direct
    references (``pkg @ url``), indexes, or files outside the build.
    """
    if seen is None:
        seen = set()
    elif name in seen:
        return []  # included already
    text = read(name)
    if text is None:
        return ["%s: no such file in the build" % name] if seen else []
    seen.add(name)
    problems = []
    lines = text.replace("\\\n", " ").splitlines()
    for number, line in enumerate(lines, 1):
        line = re.sub(r"(^|\s)#.*", "", line).strip()
        if not line:
            continue
        where = "%s:%d: %s" % (name, number, line[:80])
        first, _, rest = line.partition(" ")
        option = first.split("=", 1)[0]
        if option in ("-r", "--requirement", "-c", "--constraint"):
            target = (first.split("=", 1)[1] if "=" in first else rest).strip()
            path = posixpath.normpath(posixpath.join(posixpath.dirname(name), target))
            if target.startswith(("/", "~")) or path.startswith("..") or "://" in target:
                problems.append("%s: includes a file outside the build" % where)
            else:
                problems += requirements_problems(read, path, seen)
        elif option.startswith("-"):
            if option not in SAFE_OPTIONS:
                problems.append("%s: option %s is not allowed in a build (it can reach "
                                "beyond the build's wheels)" % (where, option))
        else:
            spec = re.split(r"\s--?[a-z]", " " + line)[0].strip()
            extra = [o.split("=", 1)[0] for o in re.findall(r"\s(--?[a-z][\w-]*)", " " + line)]
            if re.search(r"://|^\.|^/|^~|[\\/]|\.(whl|zip|tar\.gz|tgz)$", spec) or "@" in spec:
                problems.append("%s: a URL, path or direct reference (pkg @ url): name the "
                                "package and ship its wheel in wheels/" % where)
            elif set(extra) - {"--hash"}:
                problems.append("%s: option %s is not allowed in a build"
                                % (where, sorted(set(extra) - {"--hash"})[0]))
    return problems


def health_codes(text: str) -> list:
    """``"200-399"`` or ``"200,204,300-308"`` as [(low, high), ...]; ValueError saying why not."""
    ranges = []
    for part in (text.split(",") if isinstance(text, str) else [None]):
        found = re.fullmatch(r"\s*([1-5]\d\d)\s*(?:-\s*([1-5]\d\d)\s*)?", part or "")
        if not found or int(found.group(2) or found.group(1)) < int(found.group(1)):
            raise ValueError("health_status %r is not HTTP codes from 100 to 599, like \"200-399\" "
                             "or \"200,204\"" % (text,))
        ranges.append((int(found.group(1)), int(found.group(2) or found.group(1))))
    return ranges


def is_up(ranges: list, code) -> bool:
    """Whether a health probe's HTTP code (None: no answer) means up."""
    return code is not None and any(low <= code <= high for low, high in ranges)


DOTTED = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*")  # fullmatch: a module, or a name and its attributes


def parse_entry(entry: str) -> tuple:
    """An app entry as gunicorn and ``flask --app`` take it: ``module:name``,
    ``module:name.attr``, or a factory called with literal arguments,
    ``module:create_app()``, ``module:create_app("qa", debug=False)``.

    Returns (module, [name, attr...], call): call is None, or (args, kwargs)
    read with ast.literal_eval (never eval: an entry runs no code but the
    factory's). ValueError saying why it is not one.
    """
    module, colon, expr = entry.partition(":") if isinstance(entry, str) else ("", "", "")
    example = "give module:app, or module:create_app() for a factory (e.g. notes:app, flaskr:create_app())"
    if not (colon and DOTTED.fullmatch(module)):
        raise ValueError("app entry %r is not of the form module:callable: %s" % (entry, example))
    try:
        node = ast.parse(expr.strip(), mode="eval").body
    except SyntaxError:
        raise ValueError("app entry %r: %r is not a name or a call: %s" % (entry, expr, example)) from None
    call = None
    if isinstance(node, ast.Call):
        try:
            args = [ast.literal_eval(arg) for arg in node.args]
            if any(kw.arg is None for kw in node.keywords):
                raise ValueError("**")
            call = (args, {kw.arg: ast.literal_eval(kw.value) for kw in node.keywords})
        except ValueError:
            raise ValueError("app entry %r: a factory's arguments must be literals (strings, numbers, "
                             "True/False/None, lists, dicts), as in module:create_app(\"qa\")" % entry) from None
        node = node.func
    path = []
    while isinstance(node, ast.Attribute):
        path.insert(0, node.attr)
        node = node.value
    if not isinstance(node, ast.Name):
        raise ValueError("app entry %r: %r is not a name or a call of one: %s" % (entry, expr, example))
    return module, [node.id] + path, call


def static_problems(static) -> list:
    """Why an ``[app] static`` table (URL prefix = directory of the release,
    ``{"/static" = "staticfiles"}``) cannot be served, as strings."""
    if not isinstance(static, dict):
        return ["[app] static must be a table of URL prefix = directory in the release, like "
                "{\"/static\" = \"staticfiles\"}"]
    problems = []
    for prefix, path in sorted(static.items(), key=str):
        if not (isinstance(prefix, str) and HEALTH_PATH.fullmatch(prefix)):
            problems.append("[app] static: %r is not a URL prefix: start it with / (printable characters, "
                            "no spaces)" % (prefix,))
        elif not (isinstance(path, str) and name_parts(path)) or path.startswith("/") \
                or ".." in name_parts(path) or "\x00" in path:
            problems.append("[app] static: %s = %r is not a directory inside the release: name one like "
                            "\"staticfiles\" (not the release itself)" % (prefix, path))
    return problems


def entry_module_path(entry: str) -> tuple:
    """The files that can hold ``module:callable``'s module, relative to the build."""
    module = entry.split(":", 1)[0]
    base = module.replace(".", "/")
    return (base + ".py", base + "/__init__.py")


def check_sshd(banner: str) -> None:
    """Refuse tester keys on an sshd that would let them listen on the host.

    ``permitlisten`` came in OpenSSH 7.8, and an sshd that does not know a key
    option rejects the whole line: below 7.8 no safe tester line exists.
    """
    found = re.search(r"OpenSSH_(\d+)\.(\d+)", banner or "")
    if not found:
        raise Fail("sshd_unsupported", "the host's SSH server (%s) is not OpenSSH: tester keys need "
                   "OpenSSH 7.8 or newer there" % (banner or "unknown"))
    if (int(found.group(1)), int(found.group(2))) < (7, 8):
        raise Fail("sshd_too_old", "the host runs OpenSSH %s.%s, which cannot stop a key from opening "
                   "listeners on the host (permitlisten came in 7.8), so a tester could take over "
                   "other testers' ports: no tester key was added; have the host's admin upgrade "
                   "openssh-server to 7.8 or newer" % found.groups())


# Names of the app's environment that qabox sets itself (QABOX_*, PATH with the
# venv first, PYTHONUNBUFFERED), that would make the venv's python another
# (PYTHONHOME, PYTHONPATH...: every PYTHON* variable changes how python runs,
# not the app), or that would turn on Werkzeug's debugger or reloader.
DEBUG_SWITCHES = ("FLASK_DEBUG", "WERKZEUG_RUN_MAIN", "WERKZEUG_SERVER_FD", "WERKZEUG_DEBUG_PIN")  # never passed to the app
RESERVED_NAMES = ("PATH",) + DEBUG_SWITCHES
RESERVED_PREFIXES = ("QABOX_", "PYTHON")


def config_name_problem(name) -> "str | None":
    """Why ``name`` cannot be one of the app's environment variables, or None.
    The message names the name only, never a value."""
    if not isinstance(name, str) or not CONFIG_NAME.fullmatch(name):
        return "%.60r is not an environment variable name: use letters, digits and _, not starting " \
               "with a digit" % (name,)
    if name in RESERVED_NAMES or name.startswith(RESERVED_PREFIXES):
        return "%s is set by qabox itself (QABOX_*, PATH, PYTHON*, FLASK_DEBUG and Werkzeug's switches " \
               "are reserved): pick another name" % name
    return None


def environment_problems(table) -> list:
    """What is wrong with a table of environment variables (names to text)."""
    if not isinstance(table, dict):
        return ["it is not a table of NAME = \"text\""]
    problems = [config_name_problem(name) for name in sorted(table, key=str)]
    for name, value in sorted(table.items(), key=lambda item: str(item[0])):
        if not isinstance(name, str) or not CONFIG_NAME.fullmatch(name):
            continue
        if not isinstance(value, str):
            problems.append("the value of %s is not text" % name)
        elif "\0" in value:  # the kernel's environment ends each value at one: exec would fail
            problems.append("the value of %s holds a NUL character, which no environment variable can" % name)
    return [p for p in problems if p]


def release_hooks(value) -> list:
    """``[app] release`` of a build's qabox.toml (a command line, or a list of them)
    as a list of command lines, each of which splits into arguments (hook_argv);
    a Fail saying what is wrong otherwise."""
    hooks = [value] if isinstance(value, str) else value
    if not isinstance(hooks, list) or not all(isinstance(h, str) for h in hooks):
        raise Fail("bad_build", "[app] release must be a command line or a list of them, "
                   "like \"python manage.py migrate --noinput\"")
    for hook in hooks:
        hook_argv(hook)
    return hooks


def hook_argv(hook: str) -> list:
    """A release hook's arguments, split as a shell would split them (shlex), but
    never run by one: no variables, globs, pipes or ``;``."""
    try:
        argv = shlex.split(hook)
    except ValueError as e:
        raise Fail("bad_build", "[app] release hook %r cannot be split into arguments: %s" % (hook, e))
    if not argv:
        raise Fail("bad_build", "[app] release has an empty hook: give each one a command")
    return argv


# The app servers a build may run on (``[app] server``), the package each needs
# in the release's virtualenv (qabox build adds it), and the knobs of ``[server]``
# with the servers they apply to. Werkzeug's threaded server has fixed caps
# (serve.py): it takes no knobs.
SERVERS = ("werkzeug", "waitress", "gunicorn")
DEFAULT_SERVER = "werkzeug"
SERVER_PACKAGES = {"werkzeug": "werkzeug", "waitress": "waitress>=3.0", "gunicorn": "gunicorn>=27"}
SERVER_OPTIONS = {  # key: (low, high, whole numbers only, what it is, the servers it applies to)
    "threads": (1, 256, True, "a number of threads from 1 to 256", ("waitress", "gunicorn")),
    "workers": (1, 64, True, "a number of worker processes from 1 to 64", ("gunicorn",)),
    "connection_limit": (1, 10000, True, "a number of connections from 1 to 10000", ("waitress", "gunicorn")),
    "idle_timeout": (1, 3600, False, "seconds from 1 to 3600", ("waitress", "gunicorn")),
    "timeout": (1, 3600, False, "seconds from 1 to 3600", ("gunicorn",)),
}


MAX_WORKERS = 4  # gunicorn's default workers: two per core and one, at most this (a QA box has few testers)
PROCESS_MB = 100  # what one app process takes, about: a Flask or Django app with its imports


def server_processes(server: str, options: dict, cores) -> int:
    """How many app processes a server runs: gunicorn's workers (``workers``, by
    default from the host's cores), one for the others."""
    if server != "gunicorn":
        return 1
    return int(options.get("workers") or min((cores or 1) * 2 + 1, MAX_WORKERS))


def server_problems(server, options, where: str = "qabox.toml") -> list:
    """Why ``[app] server`` and ``[server]`` cannot run, each a line naming the key."""
    if server not in SERVERS:
        return ["%s: [app] server = %r is not an app server qabox runs: use %s"
                % (where, server, ", ".join('"%s"' % s for s in SERVERS))]
    if not isinstance(options, dict):
        return ["%s: [server] must be a table of knobs, like threads = 8" % where]
    problems = []
    for key in sorted(options, key=str):
        value = options[key]
        if key not in SERVER_OPTIONS:
            problems.append("%s: [server] %s is not a knob qabox knows: use %s" % (where, key, ", ".join(SERVER_OPTIONS)))
            continue
        low, high, whole, what, servers = SERVER_OPTIONS[key]
        if server not in servers:
            problems.append("%s: [server] %s applies to %s only, and the server is %s: remove it"
                            % (where, key, " and ".join(servers), server))
        elif isinstance(value, bool) or not isinstance(value, int if whole else (int, float)) \
                or not low <= value <= high:
            problems.append("%s: [server] %s = %r is not %s" % (where, key, value, what))
    return problems
