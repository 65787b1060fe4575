"""The method registry: every method and ablation arm as data, never as a copy of a training loop.

A :class:`Method` says
  - which encoder it starts from (``start``): the pre-trained one, or a randomly initialised one
    of the same architecture and training seed (the paper's "is pre-training needed?" row);
  - whether it is meta-trained and how (``meta``, a :class:`MetaArm`): where the scales/shifts
    are learned (every block, or the last residual block only), the hard-task meta-batch, and the
    ``meta`` config keys the arm fixes (second order, meta-batch size);
  - what adapts at test time and with which budget (``test_time``, a :class:`TestTime`).

The workflow's rules ask this module which methods need meta-training and which encoder they
start from; :mod:`mtl.train.meta` and :mod:`mtl.evaluate` read the same entries. Adding an arm is
adding an entry here (and its name to the schema enum in ``mtl/config.schema.yaml``; a test
keeps the two equal). No torch import: the Snakefile imports this at parse time.
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from mtl.errors import ConfigError

#: Encoder a method starts from.
PRETRAINED, RANDOM_INIT = "pretrained", "random_init"
#: Parts of the encoder: every block, or the last residual block (resnet12: layer4; resnet25: layer3).
ALL, LAST = "all", "last"
#: Base learners at test time: a fresh linear learner (SGD with a fixed budget), the meta-learned one,
#: nearest class mean, logistic regression fitted to convergence on L2-normalised features (mtl.learners.logistic).
FRESH, META_LEARNED, PROTOTYPE, LOGISTIC = "fresh", "meta", "prototype", "logistic"


@dataclass(frozen=True)
class MetaArm:
    """How a method is meta-trained (MTL's scaling/shifting over a frozen encoder)."""

    #: where scales/shifts and BN affine are meta-learned (the learner initialisation always is)
    scope: str = ALL
    #: the hard-task meta-batch
    hard_tasks: bool = False
    #: ``meta`` config keys this arm fixes, whatever config.yaml says
    overrides: Mapping[str, object] = field(default_factory=dict)


@dataclass(frozen=True)
class TestTime:
    """What adapts on each test episode's support set, and with which budget.

    ``steps``/``lr`` of None: the inner loop the model was meta-trained with (``meta.update_step``
    SGD steps at ``meta.base_lr``, stored in the model file). ``PROTOTYPE`` and ``LOGISTIC``
    learners take no steps (the logistic fit runs to convergence, :data:`mtl.learners.logistic.LOGISTIC_SETTINGS`).
    ``finetune`` names the encoder part updated together with the learner (plain SGD at
    ``encoder_lr``, BN in eval mode); None keeps the encoder fixed.
    """

    learner: str = FRESH
    finetune: str | None = None
    steps: int | None = None
    lr: float | None = None
    encoder_lr: float | None = None


@dataclass(frozen=True)
class Method:
    name: str
    summary: str
    test_time: TestTime
    start: str = PRETRAINED
    meta: MetaArm | None = None

    @property
    def meta_trained(self) -> bool:
        return self.meta is not None


#: The reference inner loop of a fresh linear learner (100 SGD steps, lr 0.01; docs/reference-implementation.md).
FT_STEPS, FT_LR = 100, 0.01
_FRESH = TestTime(learner=FRESH, steps=FT_STEPS, lr=FT_LR)
_META = TestTime(learner=META_LEARNED)

_ENTRIES = (
    Method("ft", "pre-trained encoder, fresh linear learner on frozen features", _FRESH),
    Method("logreg", "pre-trained encoder, logistic regression to convergence on L2-normalised frozen features "
           "(Tian et al. 2020)", TestTime(learner=LOGISTIC)),
    Method("proto", "pre-trained encoder, nearest class mean (Euclidean)", TestTime(learner=PROTOTYPE)),
    Method("ft_last", "pre-trained encoder; the last residual block and a fresh linear learner fine-tuned "
           "on each test support set", TestTime(FRESH, LAST, FT_STEPS, FT_LR, FT_LR)),
    Method("ft_all", "pre-trained encoder; the whole network and a fresh linear learner fine-tuned on each "
           "test support set", TestTime(FRESH, ALL, FT_STEPS, FT_LR, FT_LR)),
    Method("mtl", "meta-transfer learning: scales/shifts of every block + learner initialisation", _META,
           meta=MetaArm()),
    Method("mtl_ht", "mtl with the hard-task meta-batch", _META, meta=MetaArm(hard_tasks=True)),
    Method("mtl_last", "mtl with scales/shifts on the last residual block only", _META,
           meta=MetaArm(scope=LAST)),
    Method("mtl_2nd_order", "mtl with the second-order meta-gradient (meta.first_order: false)", _META,
           meta=MetaArm(overrides={"first_order": False})),
    Method("mtl_metabatch4", "mtl averaging 4 tasks per meta-update (meta.meta_batch: 4)", _META,
           meta=MetaArm(overrides={"meta_batch": 4})),
    Method("mtl_no_pretrain", "mtl over a randomly initialised encoder (no pre-training)", _META,
           start=RANDOM_INIT, meta=MetaArm()),
)
REGISTRY: dict[str, Method] = {m.name: m for m in _ENTRIES}
#: Methods renamed since results were first written: old name -> new name. Results and model files
#: under an old name read as the new one (:func:`current_name`); a config naming one is refused.
RENAMED: dict[str, str] = {"lr": "logreg"}  # "lr" read as the learning rate everywhere else
#: Every method, in the order tables list them.
NAMES: tuple[str, ...] = tuple(REGISTRY)


def current_name(name: str) -> str:
    """``name`` as the registry calls it now (an old name of :data:`RENAMED` becomes its new one)."""
    return RENAMED.get(name, name)


def get_method(name: str) -> Method:
    """The registry entry of ``name``, or a ConfigError listing the valid names."""
    if name in RENAMED:
        raise ConfigError(f"method '{name}' is now called '{RENAMED[name]}': write '{RENAMED[name]}' in `methods` "
                          "(results written under the old name still read as the new one)")
    if name not in REGISTRY:
        raise ConfigError(f"Unknown value '{name}' for argument method. Valid values are {{{', '.join(NAMES)}}}.")
    return REGISTRY[name]


def meta_trained(names: Iterable[str]) -> list[str]:
    """The methods of ``names`` that need a meta_train job, in the given order."""
    return [name for name in names if get_method(name).meta_trained]


def start_encoder(name: str) -> str:
    """``pretrained`` or ``random_init``: the encoder ``name`` starts from."""
    return get_method(name).start


def meta_settings(name: str, meta_config: Mapping) -> dict:
    """The ``meta`` config of a meta-trained method: config.yaml's values with the arm's overrides."""
    method = get_method(name)
    if method.meta is None:
        raise ConfigError(f"method '{name}' is not meta-trained; meta-trained methods are "
                          f"{meta_trained(NAMES)}")
    # MetaConfig.from_dict refuses a misspelt override key when the job starts (and a test does now)
    return {**dict(meta_config), **dict(method.meta.overrides)}
