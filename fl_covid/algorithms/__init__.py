"""The federated algorithms a method record can name (``Method.algorithm``), one module each."""

from __future__ import annotations

from fl_covid.algorithms.base import Algorithm, LossTerm, Payload
from fl_covid.algorithms.scaffold import Scaffold
from fl_covid.config import Config
from fl_covid.errors import ConfigError

ALGORITHMS: dict[str, type[Algorithm]] = {"none": Algorithm, "scaffold": Scaffold}


def algorithm_for(config: Config, size: int) -> Algorithm:
    """The algorithm of ``config.method`` for shared weights of ``size`` values; ConfigError naming the keys of a
    config it cannot run (checked where the run starts, before any site trains)."""
    cls = ALGORITHMS[config.spec.algorithm]
    if reasons := cls.violations(config):
        raise ConfigError(f"method {config.method!r} ({cls.name}): {'; '.join(reasons)}")
    return cls(config, size)


__all__ = ["ALGORITHMS", "Algorithm", "LossTerm", "Payload", "algorithm_for"]
