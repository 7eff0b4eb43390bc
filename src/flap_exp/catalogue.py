"""One catalogue of method facts and defaults, read by the library, the CLI, the pipeline and conf/.

For every channel metric (registered with its facts in its own module of flap_exp.methods.metric): whether it
needs calibration data, whether the official code squares its attention score, whether its official code
calibrates sequentially, and its default compensation.
The default compensation follows the official code (flap-spec.md §4 and §6): FLAP's metrics add the
baseline bias; the Wanda-sp and magnitude baselines compensate nothing. Changing a default here changes
it for `flap-exp prune`, for `prune()` and for the pipeline's grid at once (tests/test_catalogue.py).

Pure Python (no torch): the pipeline's grid expansion reads it inside Hydra composition.
"""
from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass

from .errors import FlapError
from .registry import Registry


@dataclass(frozen=True)
class MethodFacts:
    needs_data: bool  # scores read calibration statistics
    square_attn: bool  # the official code squares the attention channel score (FLAP's metrics only)
    sequential: bool  # the official code prunes layer l before calibrating layer l+1 (Wanda-sp)
    compensation: str  # default compensation: a key of COMPENSATIONS
    # "score": units ranked by the metric's channel score; "obs": chosen by greedy structured OBS in its own
    # sequential pass (the structure is then only the allocation: how many units each layer removes)
    selector: str = "score"


#: Channel metrics (= conf/metric/*.yaml), each registered in its own module of flap_exp.methods.metric with
#: its facts (MethodFacts' fields) on its score function; a fact left out takes the default here.
METRICS = Registry("metric", "flap_exp.methods.metric",
                   defaults={"needs_data": True, "square_attn": False, "sequential": False, "compensation": "none",
                             "selector": "score"})


class _Facts(Mapping[str, MethodFacts]):
    """The registered metrics' facts by name, in the registry's order (a read-only view)."""

    def __getitem__(self, name: str) -> MethodFacts:
        if name not in METRICS:
            raise KeyError(name)
        f = METRICS.get(name).facts
        return MethodFacts(f["needs_data"], f["square_attn"], f["sequential"], f["compensation"], f["selector"])

    def __iter__(self) -> Iterator[str]:
        return iter(METRICS.names())

    def __len__(self) -> int:
        return len(METRICS.names())


METHODS: Mapping[str, MethodFacts] = _Facts()

#: Structures (= conf/structure/*.yaml), each registered in its own module of flap_exp.methods.structure with its
#: facts: per_layer (decides each layer on its own: sequential metrics need one), adaptive (+ units: the selection
#: from standardized units), obs_allocation (metric obs may take it as its allocation: uniform, SlimGPT's log
#: profile, FLAP's threshold, the OBS error-curve knapsack, the KL search), obs_only (an allocation of the OBS
#: pass with no selection from scores: the reason, in words), query_units (ranks query heads).
STRUCTURES = Registry("structure", "flap_exp.methods.structure",
                      defaults={"per_layer": False, "adaptive": False, "units": None, "obs_allocation": False,
                                "obs_only": None, "query_units": False})


def structures_where(fact: str) -> tuple[str, ...]:
    """The registered structures whose `fact` holds, in the registry's order."""
    return tuple(n for n in STRUCTURES if STRUCTURES.get(n).facts[fact])

#: Text sources of data.load_text (calibration and evaluation).
CORPORA = ("wikitext2", "ptb", "wiki", "c4", "text")
#: --device values (or cuda:N) and --dtype names (runtime.py maps them to torch).
DEVICES = ("auto", "cpu", "cuda")
DTYPE_NAMES = ("float32", "bfloat16", "float16")
#: What --dtype and model.dtype accept: a dtype name, or auto (bfloat16 where the device has native bf16 matmul,
#: else float32; runtime.resolve_dtype).
DTYPE_SPECS = ("auto", *DTYPE_NAMES)


def structure_problem(metric: str, structure: str, sequential: bool) -> str | None:
    """Why `structure` cannot go with `metric` (None if it can); the prune config and the pipeline's grid ask."""
    base = structure_of(structure)
    facts = STRUCTURES.get(base).facts
    if method_facts(metric).selector == "obs":
        if not facts["obs_allocation"]:
            allowed = ", ".join(sorted(structures_where("obs_allocation")))
            return f"metric {metric} takes an allocation structure ({allowed}), not {structure!r}"
        return None
    if facts["obs_only"]:
        return f"structure {structure!r} {facts['obs_only']}: metric obs only"
    if sequential and not facts["per_layer"]:
        per_layer = ", ".join(sorted(structures_where("per_layer")))
        return f"{metric} calibrates sequentially and needs a per-layer structure ({per_layer}), not {structure!r}"
    return None



def structure_of(name: str) -> str:
    """The registry structure of a conf/structure entry: its own name, or a variant's, whose name starts with
    it (al_am_floor -> al_am: the same search with its own options, e.g. a per-layer floor)."""
    if name in STRUCTURES:
        return name
    bases = [s for s in STRUCTURES if name.startswith(s + "_")]
    if not bases:
        raise FlapError(f"unknown structure {name!r}; known: {', '.join(STRUCTURES)}, or a variant named "
                        "STRUCTURE_... (conf/structure/)")
    return max(bases, key=len)


def floor_fraction(name: str, value) -> float | None:
    """A per-layer floor (min_groups, min_channels) given as a share of the layer's units: the fraction,
    checked to lie in (0, 1); None for a count (checked where counts are)."""
    if not (isinstance(value, float) and not value.is_integer()):
        return None
    if not 0 < value < 1:
        raise FlapError(f"{name} must be a count or a fraction in (0, 1) of the layer's units, got {value}")
    return value


#: Compensation methods (= conf/compensation/*.yaml), each registered in its own module of
#: flap_exp.methods.compensation with what it reads besides the selection (`needs`: nothing, the calibration
#: statistics, or the calibration windows for its own pass), the CompensationConfig fields it reads
#: (`options`), their `check` (params dict -> FlapError) and its memory beyond the hidden states
#: (`extra_bytes`, for streamed budgets).
COMPENSATIONS = Registry("compensation", "flap_exp.methods.compensation",
                         defaults={"needs": "nothing", "options": (), "check": None, "extra_bytes": None})


def method_facts(metric: str) -> MethodFacts:
    if metric not in METHODS:
        raise FlapError(f"unknown metric {metric!r}; known metrics: {', '.join(METHODS)}")
    return METHODS[metric]


def check_compensation_name(name: str) -> str:
    COMPENSATIONS.get(name)
    return name


#: The fields of flap_exp.compensation.CompensationConfig (tests/test_catalogue.py checks they agree).
COMPENSATION_FIELDS = ("method", "damping", "form")


def check_compensation_params(params: dict, known=COMPENSATION_FIELDS) -> None:
    """A compensation's settings ({method, its options}): only known keys, valid values (before any work)."""
    extra = sorted(set(params) - set(known))
    if extra:
        raise FlapError(f"unknown compensation option(s) {', '.join(extra)}; known: {', '.join(sorted(known))}")
    if "method" not in params:
        raise FlapError("a compensation config needs a 'method'")
    entry = COMPENSATIONS.get(params["method"])
    if entry.check is not None:
        entry.check(params)


def default_compensation(metric: str, override: str | None = None) -> str:
    """The compensation a metric's cell gets when nothing is asked: `override` (conf) else the catalogue's."""
    return check_compensation_name(override if override is not None else method_facts(metric).compensation)


def is_sequential(metric: str, override: bool | None = None) -> bool:
    return method_facts(metric).sequential if override is None else bool(override)


#: The OBS pass's default damping (StructureOptions.obs_damping): lsq's default, so the selection's objective is
#: the one its lsq compensation then minimises.
OBS_DAMPING = 0.01


def is_obs_refit(metric: str, comp: Mapping, obs_damping: float) -> bool:
    """Whether compensation `comp` ({method, form, damping}) of a `metric` selection is exactly the refit the
    selection's own OBS pass computed: lsq on the pruned model's own stream, damped as the pass was. Each
    layer's pass solves that least squares before going on (compensation/obs_pass.py), so the pass's weights
    can stand in for lsq's own pass over the windows (the same numbers, up to float32 summation order)."""
    return (metric in METHODS and method_facts(metric).selector == "obs" and comp.get("method") == "lsq"
            and comp.get("form", "sequential") == "sequential"
            and float(comp.get("damping", OBS_DAMPING)) == float(obs_damping))
