"""A hyperparameter search space: config keys (dotted, as on the command line) each with a
distribution, read from YAML and checked before any trial trains.

```yaml
train.lr: {type: float, low: 1.0e-4, high: 1.0e-2, log: true}
train.warmup_steps: {type: int, low: 0, high: 300, step: 50}
model.d_model: {type: categorical, choices: [96, 128, 192]}
```

Every bound and choice is also put into the base config on its own, so a value the config
would refuse (a negative learning rate, a width the heads do not divide) is reported here,
naming the key, rather than as a failed trial later.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lmforge.common import LmforgeError, did_you_mean

KINDS = {
    "float": {"low", "high", "log"},
    "int": {"low", "high", "step", "log"},
    "categorical": {"choices"},
}
"""Each distribution's type and the fields it takes (optuna's suggest_float/int/categorical)."""


@dataclass(frozen=True)
class Param:
    key: str
    """The config key, e.g. train.lr."""
    kind: str
    low: float | int | None = None
    high: float | int | None = None
    log: bool = False
    step: int | None = None
    choices: tuple[Any, ...] = ()

    def suggest(self, trial) -> Any:
        """This parameter's value for an optuna trial."""
        if self.kind == "float":
            return trial.suggest_float(self.key, self.low, self.high, log=self.log)
        if self.kind == "int":
            return trial.suggest_int(
                self.key, self.low, self.high, step=self.step or 1, log=self.log
            )
        return trial.suggest_categorical(self.key, list(self.choices))

    def probes(self) -> list[Any]:
        """The values the base config must accept: both bounds, or every choice."""
        return list(self.choices) if self.kind == "categorical" else [self.low, self.high]

    def describe(self) -> dict[str, Any]:
        """The distribution as plain data (stored with the study to recognise it on resume)."""
        if self.kind == "categorical":
            return {"type": self.kind, "choices": list(self.choices)}
        out = {"type": self.kind, "low": self.low, "high": self.high, "log": self.log}
        return out | ({"step": self.step} if self.step else {})


def _number(where: str, value: Any, kind: str) -> float | int:
    """A bound as a number: YAML reads 1e-4 (no dot) as a string, so strings are converted."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise LmforgeError(f"{where} must be a number, got {value!r}") from None
    if kind == "int":
        if number != int(number):
            raise LmforgeError(f"{where} must be an integer, got {value!r}")
        return int(number)
    return number


def parse_param(key: str, spec: Any, where: str) -> Param:
    """One `key: {type: ..., ...}` entry of a space file, checked."""
    where = f"{where}: {key}"
    if not isinstance(spec, dict) or "type" not in spec:
        raise LmforgeError(
            f"{where} needs a mapping with a type ({', '.join(KINDS)}), e.g. "
            "{type: float, low: 1.0e-4, high: 1.0e-2, log: true}"
        )
    kind = spec["type"]
    if kind not in KINDS:
        raise LmforgeError(f"{where}: type {kind!r} is not one of {', '.join(KINDS)}")
    unknown = set(spec) - KINDS[kind] - {"type"}
    if unknown:
        name = sorted(unknown)[0]
        raise LmforgeError(
            f"{where}: a {kind} takes no {name!r}{did_you_mean(name, KINDS[kind])} "
            f"(fields: {', '.join(sorted(KINDS[kind]))})"
        )
    if kind == "categorical":
        choices = spec.get("choices")
        if not isinstance(choices, list) or not choices:
            raise LmforgeError(f"{where}: choices must be a non-empty list")
        if any(c is not None and not isinstance(c, (bool, int, float, str)) for c in choices):
            raise LmforgeError(f"{where}: each choice must be a number, string, bool or null")
        if len(set(map(repr, choices))) != len(choices):
            raise LmforgeError(f"{where}: choices repeat a value")
        return Param(key, kind, choices=tuple(choices))
    for name in ("low", "high"):
        if name not in spec:
            raise LmforgeError(f"{where}: a {kind} needs low and high")
    low, high = (_number(f"{where}.{n}", spec[n], kind) for n in ("low", "high"))
    if low >= high:
        raise LmforgeError(f"{where}: low={low} must be below high={high}")
    log = spec.get("log", False)
    if not isinstance(log, bool):
        raise LmforgeError(f"{where}: log must be true or false")
    if log and low <= 0:
        raise LmforgeError(f"{where}: a log scale needs low > 0, got {low}")
    step = spec.get("step")
    if step is not None:
        step = _number(f"{where}.step", step, kind)
        if step <= 0:
            raise LmforgeError(f"{where}: step must be > 0, got {step}")
        if log:
            raise LmforgeError(f"{where}: step and log cannot be combined")
    return Param(key, kind, low, high, log, step)


def read_space(path: str | Path) -> list[Param]:
    """The parameters of a space file, in the file's order (checked on their own; check_space
    checks them against a config)."""
    from lmforge.config import read_yaml

    data = read_yaml(path)
    if not data:
        raise LmforgeError(f"{path} names no parameters; give config keys with distributions")
    return [parse_param(str(key), spec, str(path)) for key, spec in data.items()]


def check_space(params: list[Param], base_layers: tuple, overrides: list[str], where: str) -> None:
    """Every key is a config key (not a section) and every bound or choice is a value the base
    config accepts for it; else one error line naming the key."""
    from lmforge.config import Config, build_config, dataclass_keys

    keys = dataclass_keys(Config)
    sections = {k.split(".")[0] for k in keys if "." in k}
    for p in params:
        if p.key not in keys or p.key in sections:
            raise LmforgeError(f"{where}: {p.key!r} is not a config key{did_you_mean(p.key, keys)}")
        for value in p.probes():
            try:
                build_config(*base_layers, overrides=[*overrides, override(p.key, value)])
            except LmforgeError as e:
                raise LmforgeError(f"{where}: {p.key} cannot take {value!r}: {e}") from None


def override(key: str, value: Any) -> str:
    """`--key=value`, the value written so the config reads it back as the same value."""
    import yaml

    text = yaml.safe_dump(value, default_flow_style=True, width=10_000).strip()
    return f"--{key}={text.removesuffix('...').strip()}"
