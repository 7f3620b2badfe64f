"""TRL 0.10.1 (the version InternVL's MPO recipe pins) as the reference for the preference losses.

TRL 0.10.1 imports one name that transformers 5 renamed (`MODEL_FOR_VISION_2_SEQ_MAPPING_NAMES`); it is supplied
before the import, nothing else is changed. The loss functions are TRL's own methods, called on a stand-in `self`
with the attributes they read. The combination of several loss types with weights and the `rpo_alpha` term
follows InternVL's `MultimodalDPOTrainer.get_batch_loss_metrics` (upstream code needs deepspeed and cannot run
here), one `dpo_loss` call per type.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest


def import_trl():
    pytest.importorskip("torch")
    import transformers.models.auto.modeling_auto as auto

    if not hasattr(auto, "MODEL_FOR_VISION_2_SEQ_MAPPING_NAMES"):
        auto.MODEL_FOR_VISION_2_SEQ_MAPPING_NAMES = auto.MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES
    trl = pytest.importorskip("trl")
    assert trl.__version__ == "0.10.1", trl.__version__
    from trl.trainer.dpo_trainer import DPOTrainer
    from trl.trainer.orpo_trainer import ORPOTrainer
    from trl.trainer.utils import RunningMoments

    return DPOTrainer, ORPOTrainer, RunningMoments


def trl_self(beta: float, running=None):
    _, _, RunningMoments = import_trl()
    acc = SimpleNamespace(device="cpu", use_distributed=False)
    return SimpleNamespace(beta=beta, label_smoothing=0.0, reference_free=False, f_divergence_type="reverse_kl",
                           f_divergence_params=None, accelerator=acc,
                           running=running if running is not None else RunningMoments(acc))


def trl_dpo(me, losses: dict, pc, pr, rc, rr):
    """(per-pair losses, chosen rewards, rejected rewards): upstream's weighted loop over TRL's dpo_loss."""
    DPOTrainer, _, _ = import_trl()
    total = chosen = rejected = 0
    for kind, weight in losses.items():
        me.loss_type = kind
        cur, c, r = DPOTrainer.dpo_loss(me, pc, pr, rc, rr)
        total, chosen, rejected = total + cur * weight, chosen + c * weight, rejected + r * weight
    return total, chosen, rejected


def trl_orpo(me, pc, pr):
    _, ORPOTrainer, _ = import_trl()
    losses, c, r, _, _ = ORPOTrainer.odds_ratio_loss(me, pc, pr)
    return losses, c, r
