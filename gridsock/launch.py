"""``gridsock run``: a command under the socket personality, with a running node's agent or a
node of its own."""
from __future__ import annotations

import os
import signal

__all__ = ["run_command", "RUN_JOIN_TIMEOUT_S"]


# ``gridsock run`` with a node of its own gives up if the node has not joined within this long.
RUN_JOIN_TIMEOUT_S = 60.0


def run_command(args) -> int:
    """Run ``args.command`` patched: with a running node's agent, or a node of our own."""
    import socket as stdsocket

    from .agent import agent_path
    from .errors import ConfigError
    # The launcher of the personality: the one place the framework names it.
    from .personalities.monkey import child_environment

    command = args.program[1:] if args.program[:1] == ["--"] else args.program
    if not command:
        raise ConfigError("nothing to run: gridsock run [options] -- command [args...]")
    if args.node:
        if args.session or args.name:
            raise ConfigError("give either --node NAME (a running node) or --session and --name (a node of its own)")
        agent = agent_path(args.node)
        probe = stdsocket.socket(stdsocket.AF_UNIX)
        try:
            probe.connect(agent)
        except OSError as exc:
            raise ConfigError(f"no node {args.node} runs here (agent socket {agent}: {exc.strerror or exc})") from None
        finally:
            probe.close()
        os.execvpe(command[0], command, child_environment(agent))
    if not (args.session and args.name):
        raise ConfigError("gridsock run needs --node NAME, or --session FILE and --name NAME for a node of its own")
    import gevent
    import gevent.subprocess

    from .cli import _make_node

    node = _make_node(args)
    try:
        if not node.wait_joined(RUN_JOIN_TIMEOUT_S):
            raise ConfigError(f"node {node.name} did not join its grid within {RUN_JOIN_TIMEOUT_S:g} s")
        child = gevent.subprocess.Popen(command, env=child_environment(node._agent_path))

        def forward(signum):
            if child.poll() is None:
                child.send_signal(signum)

        gevent.signal_handler(signal.SIGTERM, forward, signal.SIGTERM)
        gevent.signal_handler(signal.SIGINT, forward, signal.SIGINT)
        return child.wait()
    finally:
        node.stop()
