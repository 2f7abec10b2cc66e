"""Declarative search spaces (`search_spaces/*.yaml`) -> a define-by-run function for Optuna.

A space says which pruning methods compete, which of their hyperparameters are searched and
over what ranges, which fine-tune settings are searched, and how per-layer sparsity is
parametrised:

    methods:      declared | {method: declared | {[declared: true,] hyperparameter: spec}}
    finetune:     {recipe key: distribution | fixed value}
    sparsity:     {target_floor, split, allocation, prior, prior_strength, max_sparsity,
                   exclude, groups}

Each method declares its own search ranges next to its hyperparameters (`hp(search=...)` in
its file), so this module never names a method. `methods: declared` is every registered
method with its declared ranges (the built-in spaces); `method: declared` picks one method that
way, and `{declared: true, ...}` starts from the declared ranges and overrides the listed
hyperparameters. A plain mapping lists exactly what is searched: unlisted hyperparameters keep
the paper defaults of the method's `Params`.

A distribution is `{low, high}` (optionally `log: true`, `int: true`, `step`) or
`{choices: [...]}`; any other value is fixed. Everything is checked when the file is loaded,
against the method registry and each method's own hyperparameter ranges (declared ranges
included), so a typo fails in a second with the file and key named, not hours later inside a
Ray worker.

The space is *conditional*: `suggest` samples the method first and only that method's
hyperparameters (named `<method>.<hp>`), so samplers never see parameters that did not matter.
`decode` turns the flat config Ray hands a trial back into a typed `TrialPlan`.

`sparsity.split` says how a trial's budget is split over the layers: `sampled` (the searched
per-layer `allocation`, `projection.project`) and/or `global` (one importance ranking of every
layer's units from the dense weights, `global_split.global_targets`: Torch-Pruning's global
pruning, `global_unstructured` for weights). With both, `split` is sampled first and the
`alloc.*` parameters only for `sampled` trials; a space without the key is `sampled` only.

`sparsity.prior_strength` is how strongly the size prior prefers pruning large layers
(`projection.size_prior`: 0 is uniform, 0.5 its default). A range makes it one more searched
number of `sampled` trials (`prior_strength`): it moves every layer at once, so a sampler with a
dozen trials can learn it where it cannot learn a dozen independent offsets. A space without
the key keeps 0.5, and so does a trial config that lacks it (made before it was searched).
"""

from __future__ import annotations

import dataclasses
import functools
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .. import yamlio
from ..engine import STUDY
from ..errors import UserError
from .projection import PRIOR_STRENGTH
from .space_schema import (  # noqa: F401 - Dist and DIST_KEYS are part of this module's face
    DIST_KEYS,
    Dist,
    number,
    parse_dist,
    parse_finetune,
    parse_methods,
    parse_patterns,
)

TOP_KEYS = ("methods", "finetune", "sparsity", "description")
SPARSITY_KEYS = ("target_floor", "split", "allocation", "prior", "prior_strength",
                 "max_sparsity", "exclude", "groups")
MAX_PRIOR_STRENGTH = 3.0  # beyond it the smallest layers of any model are left dense
PRIORS = ("size", "none")  # what the sampled allocation is an offset from (projection.py)
SPLITS = ("sampled", "global")  # how a budget is split over layers (module docstring)
_GROUP_NAME = re.compile(r"^[A-Za-z0-9_.\-]+$")  # no '/': Ray un-flattens config keys on it


@dataclass(frozen=True)
class TrialPlan:
    """What one trial runs, decoded from its sampled config."""

    method: str
    params: dict[str, Any]  # typed hyperparameters of `method` (searched and fixed ones)
    finetune: dict[str, Any]  # overrides of the study's fine-tune recipe
    target: float  # fraction of the budget aimed at, in (0, 1]
    allocation: dict[str, float]  # per prunable layer, groups expanded ({} for split global)
    prunable: list[str]  # layers left after the space's exclusions, in model order
    split: str = "sampled"  # "sampled" (allocation + projection) or "global" (one ranking)
    prior_strength: float = PRIOR_STRENGTH  # of the size prior the allocation moves around


@dataclass(frozen=True)
class SearchSpace:
    methods: dict[str, dict[str, Dist]]
    finetune: dict[str, Dist] = field(default_factory=dict)
    target_floor: float = 0.6
    split: tuple[str, ...] = ("sampled",)  # the choices of SPLITS this space offers
    allocation: Dist = Dist("float", 0.05, 0.95)
    prior: str = "size"  # the allocation moves around projection.size_prior, or "none"
    prior_strength: Dist = Dist("fixed", value=PRIOR_STRENGTH)  # size_prior's strength
    max_sparsity: float = 0.999
    exclude: tuple[str, ...] = ()
    groups: dict[str, str] = field(default_factory=dict)  # group name -> regex on layer names
    source: str = "<search space>"

    # -- loading ------------------------------------------------------------------------------
    @classmethod
    def load(cls, path: str | Path) -> SearchSpace:
        p = Path(path)
        d = yamlio.load(p, "search space")
        return cls.from_dict(d, source=str(p))

    @classmethod
    def from_dict(cls, d: Any, source: str = "<search space>") -> SearchSpace:
        """Validate a parsed space; every problem is a one-line `UserError` naming the key."""
        def fail(key: str, msg: str) -> UserError:
            return UserError(f"{source}: {key}: {msg}")

        if not isinstance(d, dict):
            raise UserError(f"{source}: a search space must be a mapping with a 'methods' key, "
                            f"got {type(d).__name__}")
        unknown = [k for k in d if k not in TOP_KEYS]
        if unknown:
            raise fail(str(unknown[0]), f"unknown top-level key; allowed: {', '.join(TOP_KEYS)}")
        methods = parse_methods(d.get("methods"), fail)
        finetune = parse_finetune(d.get("finetune"), fail)
        sp = d.get("sparsity") or {}
        if not isinstance(sp, dict):
            raise fail("sparsity", f"must be a mapping, got {type(sp).__name__}")
        bad = [k for k in sp if k not in SPARSITY_KEYS]
        if bad:
            raise fail(f"sparsity.{bad[0]}", f"unknown key; allowed: {', '.join(SPARSITY_KEYS)}")
        floor = number(sp.get("target_floor", 0.6), "sparsity.target_floor", fail)
        if not 0.0 < floor <= 1.0:
            raise fail("sparsity.target_floor", f"must be in (0, 1], got {floor}")
        max_s = number(sp.get("max_sparsity", 0.999), "sparsity.max_sparsity", fail)
        if not 0.0 < max_s < 1.0:
            raise fail("sparsity.max_sparsity", f"must be in (0, 1), got {max_s}")
        split = sp.get("split", ["sampled"])
        split = [split] if isinstance(split, str) else split
        if not isinstance(split, list) or not split or any(v not in SPLITS for v in split) \
                or len(set(split)) != len(split):
            raise fail("sparsity.split", f"must be a non-empty list of distinct values among "
                                         f"{', '.join(SPLITS)}, got {sp.get('split')!r}")
        alloc = parse_dist(sp.get("allocation", {"low": 0.05, "high": 0.95}),
                            "sparsity.allocation", fail)
        if alloc.kind not in ("float", "fixed"):
            raise fail("sparsity.allocation", "must be {low, high} or a fixed number")
        for v in alloc.probes():
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0.0 < v < 1.0:
                raise fail("sparsity.allocation", f"values must lie in (0, 1), got {v!r}")
        prior = sp.get("prior", "size")
        if prior not in PRIORS:
            raise fail("sparsity.prior", f"must be one of {', '.join(PRIORS)}, got {prior!r}")
        strength = parse_dist(sp.get("prior_strength", PRIOR_STRENGTH),
                              "sparsity.prior_strength", fail)
        if strength.kind not in ("float", "fixed"):
            raise fail("sparsity.prior_strength", "must be {low, high} or a fixed number")
        for v in strength.probes():
            if isinstance(v, bool) or not isinstance(v, (int, float)) \
                    or not 0.0 <= v <= MAX_PRIOR_STRENGTH:
                raise fail("sparsity.prior_strength",
                           f"values must lie in [0, {MAX_PRIOR_STRENGTH:g}], got {v!r}")
        if "prior_strength" in sp and prior != "size":
            raise fail("sparsity.prior_strength", "only applies with prior: size")
        exclude = parse_patterns(sp.get("exclude", []), "sparsity.exclude", fail)
        groups_raw = sp.get("groups") or {}
        if not isinstance(groups_raw, dict):
            raise fail("sparsity.groups", "must be a mapping of group name -> regex")
        groups: dict[str, str] = {}
        for name, pattern in groups_raw.items():
            if not isinstance(name, str) or not _GROUP_NAME.match(name):
                raise fail(f"sparsity.groups.{name}", "group names use letters, digits, _ . -")
            groups[name] = parse_patterns([pattern], f"sparsity.groups.{name}", fail)[0]
        return cls(methods=methods, finetune=finetune, target_floor=float(floor),
                   split=tuple(split), allocation=alloc, prior=prior,
                   prior_strength=strength, max_sparsity=float(max_s),
                   exclude=tuple(exclude),
                   groups=groups, source=source)

    # -- layers -------------------------------------------------------------------------------
    def prunable(self, layers: list[str]) -> list[str]:
        """`layers` minus those matching an `exclude` pattern; refuses to exclude them all."""
        kept = [n for n in layers if not any(re.search(p, n) for p in self.exclude)]
        if layers and not kept:
            raise UserError(f"{self.source}: sparsity.exclude: the patterns exclude every "
                            f"prunable layer of the model ({', '.join(layers)})")
        return kept

    def alloc_keys(self, layers: list[str]) -> dict[str, list[str]]:
        """Allocation parameter -> the layers it drives (first matching group wins)."""
        keys: dict[str, list[str]] = {}
        for n in self.prunable(layers):
            group = next((g for g, p in self.groups.items() if re.search(p, n)), None)
            keys.setdefault(group if group is not None else n, []).append(n)
        for key, members in keys.items():
            if key in self.groups and key in layers and members != [key]:
                raise UserError(f"{self.source}: sparsity.groups.{key}: a group may not be "
                                f"named like a layer of the model")
        return keys

    def for_budget(self, structured: bool) -> SearchSpace:
        """The space a budget can use: under a `flops=` limit only whole-channel pruning lowers
        the compacted model's FLOPs, so only methods that can prune filters stay, with
        `granularity` fixed to 'filter'. A space left with no method is a `UserError`."""
        if not structured:
            return self
        from ..pruning import get_method

        methods: dict[str, dict[str, Dist]] = {}
        for name, dists in self.methods.items():
            cls = get_method(name)
            if "filter" not in cls.granularities():
                continue
            if any(f.name == "granularity" for f in dataclasses.fields(cls.Params)):
                dists = {k: d for k, d in dists.items() if k not in cls.weight_only_params}
                dists = {**dists, "granularity": Dist("fixed", value="filter")}
            methods[name] = dists
        if not methods:
            raise UserError(f"{self.source}: no method of this space can prune whole filters, "
                            f"which a flops= budget needs (use sparse_flops=, params= or weights=)")
        return dataclasses.replace(self, methods=methods)

    def for_data(self, study_augments: set[str], dataset_default: str,
                 streamed: bool) -> SearchSpace:
        """The space a study's data can use: `finetune.augment` (the batch transform of both
        phases) keeps only the choices that differ from `study`, the study's own recipes
        (`study_augments`: the transforms they name; `dataset_default` is what `default`
        names). A streamed dataset crops on its own, so `study` is its only choice (another
        fixed value is a `UserError`). A choice left alone is fixed: the sampler then spends
        no trials on a dimension that changes nothing (MNIST studies without augmentation)."""
        dist = self.finetune.get("augment")
        if dist is None:
            return self
        values = dist.probes()
        if streamed:
            keep = [v for v in values if v == STUDY]
            if not keep:
                raise UserError(f"{self.source}: finetune.augment is for in-memory datasets; "
                                f"a streamed dataset trains with its own crops ({STUDY})")
        else:
            def same(v: Any) -> bool:
                return study_augments == {dataset_default if v == "default" else v}
            keep = [v for v in values if v == STUDY or STUDY not in values or not same(v)]
        if keep == values:
            return self
        narrowed = (Dist("fixed", value=keep[0]) if len(keep) == 1
                    else dataclasses.replace(dist, choices=tuple(keep)))
        return dataclasses.replace(self, finetune={**self.finetune, "augment": narrowed})

    # -- Optuna -------------------------------------------------------------------------------
    def suggest(self, trial: Any, layers: list[str]) -> dict[str, Any]:
        """Define-by-run space: sample a method, then only its hyperparameters.

        Returns the fixed values (method hyperparameters, fine-tune settings, target) as
        constants: Ray merges them into the trial's config, so a config is self-describing,
        and Optuna's sampler never sees them.
        """
        keys = self.alloc_keys(layers)  # validates the exclusions before anything is sampled
        const: dict[str, Any] = {}
        method = trial.suggest_categorical("method", list(self.methods))
        for hp, dist in self.methods[method].items():
            name = f"{method}.{hp}"
            if dist.fixed:
                const[name] = dist.value
            else:
                dist.suggest(trial, name)
        for key, dist in self.finetune.items():
            name = f"finetune.{key}"
            if dist.fixed:
                const[name] = dist.value
            else:
                dist.suggest(trial, name)
        if self.target_floor < 1.0:
            trial.suggest_float("target", self.target_floor, 1.0)
        else:
            const["target"] = 1.0
        if len(self.split) > 1:
            split = trial.suggest_categorical("split", list(self.split))
        else:
            split = self.split[0]
            if split != "sampled":  # sampled-only configs stay as they were before `split`
                const["split"] = split
        if split == "sampled" and not self.allocation.fixed:
            for key in keys:
                self.allocation.suggest(trial, f"alloc.{key}")
        if split == "sampled" and self.prior == "size" and not self.prior_strength.fixed:
            self.prior_strength.suggest(trial, "prior_strength")
        return const

    def define_by_run(self, layers: list[str]) -> Callable[[Any], dict[str, Any]]:
        """`suggest` bound to a model's layers, as `OptunaSearch(space=...)` wants it.

        Unlike a lambda it pickles, which Ray needs: Tune saves the searcher's state
        (including its `space`) to the experiment folder.
        """
        return functools.partial(self.suggest, layers=list(layers))

    def decode(self, config: dict[str, Any], layers: list[str]) -> TrialPlan:
        """The typed plan of a config produced by `suggest` (extra keys are ignored)."""
        from ..pruning import get_method

        def get(name: str, dist: Dist) -> Any:
            if dist.fixed:
                return dist.value
            if name not in config:
                raise UserError(f"trial config lacks '{name}': was it sampled from "
                                f"{self.source}? (the space changed since, or a resume mixes "
                                f"spaces)")
            return config[name]

        keys = self.alloc_keys(layers)  # validates the exclusions first
        method = config.get("method")
        if method not in self.methods:
            raise UserError(f"trial config method {method!r} is not in {self.source} "
                            f"(methods: {', '.join(self.methods)})")
        raw = {hp: get(f"{method}.{hp}", d) for hp, d in self.methods[method].items()}
        typed = get_method(method).make_params(**dict(raw))
        params = {hp: getattr(typed, hp) for hp in raw}
        finetune = {k: get(f"finetune.{k}", d) for k, d in self.finetune.items()}
        target = float(get("target", Dist("float"))) if self.target_floor < 1.0 else 1.0
        # a config of a space without `split` (or of an older run) is a sampled split
        split = config.get("split", self.split[0] if len(self.split) == 1 else "sampled")
        if split not in self.split:
            raise UserError(f"trial config split {split!r} is not in {self.source} "
                            f"(sparsity.split: {', '.join(self.split)})")
        allocation: dict[str, float] = {}
        if split == "sampled":
            for key, members in keys.items():
                value = float(get(f"alloc.{key}", self.allocation))
                allocation.update(dict.fromkeys(members, value))
        strength = (self.prior_strength.value if self.prior_strength.fixed
                    else config.get("prior_strength", PRIOR_STRENGTH))
        return TrialPlan(method=method, params=params, finetune=finetune, target=target,
                         allocation=allocation, prunable=self.prunable(layers), split=split,
                         prior_strength=float(strength))


# -- validation helpers ----------------------------------------------------------------------
