"""A hospital runs only the code it approved.

``fl-covid-clientapp`` stands in for Flower's ``flwr-clientapp``, the process a SuperNode launches for every
message of a run (``deploy/start_supernode.sh`` puts it first on the SuperNode's PATH under that name). Before
Flower installs or imports anything of the run's app bundle (FAB), it checks the bundle's SHA-256 against
``approved-apps`` of the site's policy (the YAML file in ``$FL_COVID_SITE_POLICY``). An unapproved bundle is
refused with a short reason to the server; none of its code runs. ``fl-covid-app-hash [APP_DIR]`` prints the
digest of the bundle ``flwr run APP_DIR`` would send, for the hospital to approve after reviewing that code.

Flower 1.42 verifies bundles only against signatures of its hub (``--trusted-entities``), which a self-hosted
federation does not have; this guard wraps the one call of Flower's ClientApp runtime that installs the bundle.
"""

from __future__ import annotations

import hashlib
import logging
import os
import sys
from pathlib import Path

from fl_covid.config import POLICY_ENV, ConfigError, load_site_policy

log = logging.getLogger("fl-covid-clientapp")


class AppNotApproved(RuntimeError):
    """The run's app bundle is not among the site's approved apps."""


def app_digest(fab: bytes) -> str:
    return hashlib.sha256(fab).hexdigest()


def main() -> None:
    """Flower's ``flwr-clientapp`` with the approved-apps check in front of the bundle's installation."""
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
    if install is None:  # this Flower release loads apps differently: fail closed
        sys.exit("fl-covid-clientapp: this Flower version has no ClientApp install step to guard; refusing to run")

    def checked_install(fab: bytes, *args: object, **kwargs: object) -> Path:
        digest = app_digest(fab)
        if digest not in approved:
            log.error("refused app bundle %s: not among approved-apps of the site policy %s", digest,
                      policy_file or f"(none: ${POLICY_ENV} is not set)")
            raise AppNotApproved("app not approved by the site")
        log.info("app bundle %s is approved", digest)
        return install(fab, *args, **kwargs)

    runtime.install_from_fab = checked_install
    flwr_clientapp()


def main_hash(argv: list[str] | None = None) -> int:
    """``fl-covid-app-hash [APP_DIR]``: the SHA-256 of the app bundle that ``flwr run APP_DIR`` sends."""
    from flwr.cli.build import build_fab_from_disk

    args = sys.argv[1:] if argv is None else argv
    if len(args) > 1 or (args and args[0].startswith("-")):
        print("usage: fl-covid-app-hash [APP_DIR]  (default: the current folder)", file=sys.stderr)
        return 2
    print(app_digest(build_fab_from_disk(Path(args[0] if args else "."))))
    return 0
