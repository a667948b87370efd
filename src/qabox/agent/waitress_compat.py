"""Every name of waitress's internals qabox uses, in one place, checked when loaded.

waitress's public ``create_server(app, sockets=[...])`` serves pre-bound
sockets, but only all of them from the start and until the process ends. qabox
needs more of it (serve.py's contract): the probe socket at once and the
others at go-live, tester sockets added and removed while it runs, no new
connection from the moment it is retired, a cap per port, and idle keep-alive
connections closed while it drains. So it makes one server object per socket
on one shared socket map and task dispatcher, as ``create_server`` itself does,
from the classes and attributes below. ``load()`` checks each exists and says
which waitress to pin when one does not (the agent itself stays stdlib-only:
waitress is imported here, in the app's process, and only there).
"""

import inspect

MINIMUM = "3.0"  # tested with 3.0.2; qabox build asks for waitress>=3.0 (rules.SERVER_PACKAGES)


class Waitress:
    """The waitress classes qabox builds on."""

    def __init__(self):
        import waitress
        from waitress import adjustments, channel, server, task, trigger

        self.version = getattr(waitress, "__version__", None) or version_of("waitress")
        self.Adjustments = adjustments.Adjustments
        self.ThreadedTaskDispatcher = task.ThreadedTaskDispatcher
        self.TcpWSGIServer = server.TcpWSGIServer
        self.HTTPChannel = channel.HTTPChannel
        self.WSGITask = task.WSGITask
        missing = [name for obj, name in (
            (server.TcpWSGIServer, "readable"), (server.TcpWSGIServer, "maintenance"),
            (server.TcpWSGIServer, "del_channel"), (server.TcpWSGIServer, "run"),
            (server.TcpWSGIServer, "channel_class"), (server.TcpWSGIServer, "next_channel_cleanup"),
            (channel.HTTPChannel, "task_class"), (channel.HTTPChannel, "will_close"),
            (channel.HTTPChannel, "handle_close"), (task.WSGITask, "build_response_header"),
            (task.ThreadedTaskDispatcher, "set_thread_count"), (trigger.trigger, "pull_trigger"),
        ) if not hasattr(obj, name)]
        init = inspect.signature(server.BaseWSGIServer.__init__).parameters
        missing += ["BaseWSGIServer(%s=)" % name for name in ("map", "_sock", "dispatcher", "adj", "sockinfo",
                                                            "bind_socket") if name not in init]
        if "thunk" not in inspect.signature(trigger.trigger.pull_trigger).parameters:
            missing.append("trigger.pull_trigger(thunk=)")
        if missing:
            raise RuntimeError("waitress %s lacks %s, which qabox serves with: pin waitress>=%s in the "
                               "build's requirements" % (self.version, ", ".join(missing), MINIMUM))

    @staticmethod
    def idle(channel) -> bool:
        """Whether a connection waits for its next request: none in progress,
        none half read, nothing left to send."""
        return not channel.requests and channel.request is None and not channel.total_outbufs_len

    @staticmethod
    def channels(server) -> list:
        return list(server.active_channels.values())

    @staticmethod
    def stop_accepting(server) -> None:
        """In the loop's thread: not one more accept on this socket."""
        server.accepting = False
        server.del_channel()  # out of the map: not polled again, not even later in this round

    @staticmethod
    def in_loop(server, thunk) -> None:
        server.trigger.pull_trigger(thunk)


def version_of(package: str) -> str:
    try:
        from importlib.metadata import version

        return version(package)
    except Exception:
        return "?"
