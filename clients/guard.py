"""A hospital runs only the code it approved.

``fl-covid-clientapp`` stands in for Flower's ``flwr-clientapp``, the process a SuperNode launches for every
message of a run (``deploy/start_supernode.sh`` puts it first on the SuperNode's PATH under that name). Before
Flower installs or imports anything of the run's app bundle (FAB), it checks the bundle's SHA-256 against
``approved-apps`` of the site's policy (the YAML file in ``$FL_COVID_SITE_POLICY``). An unapproved bundle is
refused with a short reason to the server; none of its code runs. ``fl-covid-app-hash [APP_DIR]`` prints the
digest of the bundle ``flwr run APP_DIR`` would send, for the hospital to approve after reviewing that code.

Flower 1.42 verifies bundles only against signatures of its hub (``--trusted-entities``), which a self-hosted
federation does not have; this guard wraps the one call of Flower's ClientApp runtime that installs the bundle,
refuses a bundle that declares components other than a ServerApp and a ClientApp, and checks that the folder
Flower then loads the ClientApp from is the one it installed from the verified bytes.

A SuperNode starts other task processes too, by name from its PATH (``flwr-agentapp`` for a bundle declaring an
``agentapp``, and ``flwr-serverapp``, ``flwr-simulation``, ``flwr-connector``, ``flwr-model``): at a site each of
these names is ``refuse``: Flower's own program with the bundle's installation refused, so that the task fails
through Flower's error path before any of the bundle's code runs.
"""

from __future__ import annotations

import hashlib
import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fl_covid.errors import ConfigError
from fl_covid.policy import POLICY_ENV, load_site_policy

log = logging.getLogger("fl-covid-clientapp")


class AppNotApproved(RuntimeError):
    """The run's app bundle is not among the site's approved apps."""


# the task processes a Flower 1.42 SuperNode may start besides flwr-clientapp (flwr.supercore.constant
# .TASK_TYPE_TO_COMMAND), refused at a site (``refuse``, installed under these names by deploy/start_supernode.sh):
# name -> (module, function) of Flower's program and the module whose install_from_fab it calls, or None for a task
# that installs no app bundle
REFUSED_TASKS: dict[str, tuple[str, str, str] | None] = {
    "flwr-agentapp": ("flwr.supercore.cli", "flwr_agentapp", "flwr.supercore.task_process.agent.run_agentapp"),
    "flwr-serverapp": ("flwr.superlink.cli", "flwr_serverapp", "flwr.superlink.runtime.run_serverapp"),
    "flwr-simulation": ("flwr.simulation.app", "flwr_simulation", "flwr.simulation.app"),
    "flwr-connector": None,
    "flwr-model": None,
}
COMPONENTS = {"serverapp", "clientapp"}  # what an approved bundle may declare in [tool.flwr.app.components]


def app_digest(fab: bytes) -> str:
    return hashlib.sha256(fab).hexdigest()


def main() -> None:
    """Flower's ``flwr-clientapp`` with the approved-apps check in front of the bundle's installation."""
    from flwr.common.config import get_project_dir
    from flwr.supernode.cli.flwr_clientapp import flwr_clientapp
    from flwr.supernode.runtime import run_clientapp as runtime

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    policy_file = os.environ.get(POLICY_ENV, "")
    try:
        approved = set(load_site_policy(Path(policy_file)).approved_apps) if policy_file else set()
    except ConfigError as e:
        log.error("%s; refusing every app", e)
        approved = set()
    install = getattr(runtime, "install_from_fab", None)
    loader = getattr(runtime, "get_load_client_app_fn", None)
    if install is None or loader is None:  # this Flower release loads apps differently: fail closed
        sys.exit("fl-covid-clientapp: this Flower version has no ClientApp install and load steps to guard; "
                 "refusing to run")
    verified: dict[str, Path] = {}  # digest -> the folder its bytes were installed in

    def checked_install(fab: bytes, *args: object, **kwargs: object) -> Path:
        digest = app_digest(fab)
        if digest not in approved:
            log.error("refused app bundle %s: not among approved-apps of the site policy %s", digest,
                      policy_file or f"(none: ${POLICY_ENV} is not set)")
            raise AppNotApproved("app not approved by the site")
        if extra := declared_components(fab) - COMPONENTS:
            log.error("refused app bundle %s: it declares components %s besides %s", digest, sorted(extra),
                      sorted(COMPONENTS))
            raise AppNotApproved("app not approved by the site")
        log.info("app bundle %s is approved", digest)
        verified[digest] = Path(install(fab, *args, **kwargs)).resolve()
        return verified[digest]

    def checked_loader(*args: object, **kwargs: object) -> Callable[[str, str, str], Any]:
        load = loader(*args, **kwargs)

        def checked_load(fab_id: str, fab_version: str, fab_hash: str) -> Any:
            folder = Path(get_project_dir(fab_id, fab_version, fab_hash)).resolve()
            if verified.get(fab_hash) != folder:
                log.error("refused to load the ClientApp from %s: it is not the folder of the verified bundle "
                          "(%s)", folder, ", ".join(f"{d}: {f}" for d, f in verified.items()) or "none installed")
                raise AppNotApproved("app not approved by the site")
            return load(fab_id, fab_version, fab_hash)

        return checked_load

    runtime.install_from_fab = checked_install
    runtime.get_load_client_app_fn = checked_loader
    flwr_clientapp()


def declared_components(fab: bytes) -> set[str]:
    """The component names a bundle declares in its pyproject.toml (``[tool.flwr.app.components]``)."""
    from flwr.common.config import get_fab_config

    return set(get_fab_config(fab)["tool"]["flwr"]["app"].get("components", {}))


def refuse(task: str) -> None:
    """At a site, every task process but the ClientApp (``REFUSED_TASKS``). For a task that installs an app bundle
    (an ``agentapp``, ...): Flower's own program with that installation refused, so that none of the bundle's code
    runs and the task fails through Flower's own error path (a process that just exited would leave the task
    pending, and the SuperNode would start it again and again instead of the next run's ClientApps). Any other task
    is refused outright. The refusal goes to the site's log."""
    import importlib

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    reason = f"refused to start {task}: this site runs only the ClientApp of an approved app bundle"
    entry = REFUSED_TASKS.get(task)
    if entry is None:
        log.error(reason)
        sys.exit(1)
    module, function, runtime = entry

    def refused_install(*args: object, **kwargs: object) -> Path:
        log.error(reason)
        raise AppNotApproved(reason)

    program = getattr(importlib.import_module(module), function)
    importlib.import_module(runtime).install_from_fab = refused_install
    sys.argv[0] = task
    program()


def main_hash(argv: list[str] | None = None) -> int:
    """``fl-covid-app-hash [APP_DIR]``: the SHA-256 of the app bundle that ``flwr run APP_DIR`` sends."""
    from flwr.cli.build import build_fab_from_disk

    args = sys.argv[1:] if argv is None else argv
    if len(args) > 1 or (args and args[0].startswith("-")):
        print("usage: fl-covid-app-hash [APP_DIR]  (default: the current folder)", file=sys.stderr)
        return 2
    print(app_digest(build_fab_from_disk(Path(args[0] if args else "."))))
    return 0
