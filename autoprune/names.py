"""Metric, tag and role names, defined once.

Trials report, the search ranks, MLflow stores and reports read these keys: spelling them in one
module keeps the producers and consumers from drifting apart (a typo would silently produce an
empty column in the MLflow UI rather than an error).
"""

# Metrics of one pruned model (and of the dense baseline, with DENSE_PREFIX on the parent run).
VAL_ACC = "val_accuracy"
VAL_LOSS = "val_loss"  # mean cross-entropy on the validation split: breaks accuracy ties
TEST_ACC = "test_accuracy"
FLOPS_FRAC = "flops_frac"  # pruned MACs / dense MACs (mask-aware)
PARAMS_FRAC = "params_frac"  # non-zero params / dense params
COMPACT_FLOPS_FRAC = "compact_flops_frac"  # MACs after physical channel removal / dense MACs
FLOPS = "flops"
PARAMS = "params"
DENSE_PREFIX = "dense_"

# Metrics of a whole search (parent run).
HYPERVOLUME = "hypervolume"
PARETO_SIZE = "pareto_size"
TRIALS_COMPLETED = "trials_completed"
TRIALS_FAILED = "trials_failed"
TRIALS_STOPPED = "trials_stopped_early"  # stopped by ASHA (KILLED runs with TAG_STOPPED)

# Tags.
TAG_PARETO = "autoprune.pareto"  # "true"/"false" on each trial run
TAG_METHOD = "autoprune.method"
TAG_TRIAL = "autoprune.trial"  # the Optuna/Ray trial number, as a decimal string
TAG_STUDY = "autoprune.study"
TAG_ROLE = "autoprune.role"  # ROLE_SEARCH on the parent, ROLE_TRIAL on children
TAG_FEASIBLE = "autoprune.feasible"  # "true"/"false": the trial meets the budget
TAG_ERROR = "autoprune.error"  # truncated error text of a failed trial
TAG_STOPPED = "autoprune.stopped_early"  # why ASHA stopped a trial (its run ends KILLED)
TAG_NOTE = "mlflow.note.content"  # the run's description in the MLflow UI
TAG_BUDGET = "autoprune.budget"
TAG_VERSION_PREFIX = "autoprune.version."  # + package name: torch, ray, optuna, mlflow, ...
TAG_PARENT = "mlflow.parentRunId"  # MLflow's own key for nesting runs in the UI
TAG_BASELINE = "autoprune.baseline"  # "true" on the run of an enqueued hand-baseline trial
TAG_FINALIST = "autoprune.finalist"  # "true" on a trial run retrained by the finalist stage
TAG_FINALIST_OF = "autoprune.finalist_of"  # on a finalist run: the trial number it retrains
TAG_SEARCH = "autoprune.search_run"  # on a finalist run: the search's parent run id

ROLE_SEARCH = "search"
ROLE_TRIAL = "trial"
ROLE_FINALIST = "finalist"
SEARCH_PREFIX = "search/"  # a finalist's trial run keeps its search-time accuracy under this

# Artifacts.
ART_CONFIG = "config.yaml"
ART_LAYER_SPARSITY = "layer_sparsity.json"
ART_ERROR = "error.txt"
ART_FRONT_CSV = "pareto_front.csv"
ART_FRONT_JSON = "pareto_front.json"
ART_TRIALS_CSV = "trials.csv"
ART_PLOT = "pareto.png"

# The objectives of the search: accuracy up, cost down.
OBJECTIVES: tuple[tuple[str, str], ...] = ((VAL_ACC, "max"), (FLOPS_FRAC, "min"),
                                           (PARAMS_FRAC, "min"))
