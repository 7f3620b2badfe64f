"""The LoRA training loop: mlx-lm's trainer shape, with token-weighted accumulation and exact resume.

- One compiled step (`mx.compile(inputs=state, outputs=state)` over model, optimizer and RNG state) computes the
  summed cross-entropy over answer tokens and its gradient, adds it to the running gradient of the optimizer step,
  and on the last microbatch scales by `world / total answer tokens`, averages over processes
  (`mlx.nn.utils.average_gradients`) and applies AdamW. The update is therefore the gradient of the mean loss per
  answer token over the whole effective batch (microbatches x processes), however the tokens are split — unlike
  mlx-lm, which averages per-microbatch means. That is what makes a 2-process run equal a 1-process run with twice
  the accumulation.
- Optimizer step s uses global microbatches (s-1)*A*W ... s*A*W-1 of the stream; process r takes every W-th.
- Image features enter through positions computed with the batch (`model.image_positions`) and the merge of
  inference (`model.scatter_image_features`), so nothing in the step reads values back to the host.
- `Run` is the state one run carries between steps: batches, optimizer, loss window, log and result.
- Gradient checkpointing (`checkpointing.py`) recomputes decoder (and trained ViT) layers in the backward pass.
- With a `PreferenceConfig` (DPO/MPO/ORPO): pair data (`pairs.py`), `pref_step.py`'s step, TRL's metrics.
- With `LoraConfig.train_flash` (a Flash checkpoint): one of ViCO's two stages (`vico.py`) replaces SFT's loss.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Callable, List, Optional

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
from tqdm import tqdm

from ..adapters import CONFIG_FILE, LoraConfig, apply_lora, read_adapter_config, trainable_weights
from ..errors import UserError
from ..files import check_writable_dir, output_errors, save_json, sweep_stale
from ..validate import check_training_args
from .batching import Batcher, encode_dataset, pad_id, report_problems
from .checkpointing import grad_checkpointing, layer_types
from .curve import LossLog
from .data import Dataset
from .forward import loss_sum, training_logits
from .pairs import PairBatcher, encode_pairs
from .pref_step import (
    accumulate,
    check_preference_setup,
    init_preference_state,
    make_preference_step,
    preference_optimizer_step,
)
from .preference import METRICS, PreferenceConfig, metrics_dict
from .reference import make_reference
from .state import adapters_finite, latest_checkpoint, load_checkpoint, save_checkpoint, stop_diverged
from .validation import validate
from .vico import FlashBatcher, setup_flash

# Settings that define the data stream; a resumed run must keep them or it would not continue the same run.
STREAM_SETTINGS = ("batch_size", "seed", "max_length", "max_tiles", "grad_accum", "preference", "flash")


@dataclass
class TrainingArgs:
    batch_size: int = 1  # samples per microbatch, per process
    grad_accum: int = 1  # microbatches per optimizer step, per process
    lr: float = 1e-4
    warmup: int = 0  # optimizer steps of linear warmup from 0
    min_lr: float = 0.0  # where the cosine decay ends
    weight_decay: float = 0.0
    iters: Optional[int] = None  # optimizer steps; default: `epochs` worth
    epochs: Optional[float] = None  # default 1 when iters is not given
    max_length: int = 4096
    max_tiles: Optional[int] = None  # tiles per image (split over images in multi-image samples)
    val_every: int = 100  # optimizer steps between validations (0: only first and last)
    val_batches: int = -1  # -1: the whole validation set
    save_every: int = 100
    report_every: int = 10
    grad_checkpoint: bool = False
    seed: int = 0
    compile: bool = True
    keep_checkpoints: int = 2
    skip_bad: bool = False
    # AdamW with bias correction, as torch.optim.AdamW (upstream InternVL, XTuner, ms-swift); False is MLX's
    # default, whose early steps are several times larger than --lr.
    bias_correction: bool = True
    flash_percentile: float = 50.0  # --train-flash router: ratios below this percentile of the window -> compress
    flash_window: int = 2048  # --train-flash router: how many of the latest loss ratios set that percentile


@dataclass
class TrainResult:
    adapter_path: Path
    steps: int
    start_step: int
    train_loss: Optional[float] = None
    val_losses: List[tuple] = field(default_factory=list)  # (step, loss)
    tokens_per_second: Optional[float] = None
    peak_memory_gb: Optional[float] = None
    skipped: List[str] = field(default_factory=list)
    truncated: int = 0


def make_step(model, optimizer, frozen_features: bool = True, compile: bool = True, loss=loss_sum):
    """`(step, state)`: `step(batch, prev_grad, do_update, scale) -> (ce_sum, n_answer_tokens, grad or None)`.

    The gradient of the summed cross-entropy is added to `prev_grad`; with `do_update` the total is multiplied by
    `scale` (world / answer tokens of the whole step), averaged over processes and applied. `state` is what the
    compiled function reads and writes (model, optimizer, RNG); evaluate it after each call.
    """
    value_and_grad = nn.value_and_grad(model, partial(loss, frozen_features=frozen_features))
    state = [model.state, optimizer.state, mx.random.state]

    def step(batch, prev_grad, do_update, scale):
        (ce, ntok), grad = value_and_grad(model, batch)
        return ce, ntok, accumulate(model, optimizer, grad, prev_grad, do_update, scale)

    return (mx.compile(step, inputs=state, outputs=state) if compile else step), state


def make_optimizer(args: TrainingArgs, total_steps: int):
    decay = max(1, total_steps - args.warmup)
    schedule = optim.cosine_decay(args.lr, decay, end=args.min_lr)
    if args.warmup:
        schedule = optim.join_schedules([optim.linear_schedule(0.0, args.lr, args.warmup), schedule], [args.warmup])
    return optim.AdamW(learning_rate=schedule, weight_decay=args.weight_decay, bias_correction=args.bias_correction)


def total_steps(args: TrainingArgs, n_batches: int, world: int) -> int:
    if args.iters is not None:
        if args.iters < 1:
            raise UserError(f"--iters must be at least 1, got {args.iters}")
        return args.iters
    epochs = 1.0 if args.epochs is None else args.epochs
    if epochs <= 0:
        raise UserError(f"--epochs must be positive, got {epochs}")
    return max(1, math.ceil(epochs * n_batches / (args.grad_accum * world)))


@dataclass
class Run:
    """What a training run carries from one optimizer step to the next."""

    model: nn.Module
    args: TrainingArgs
    out: Path
    group: object  # mx.distributed group
    say: Callable[[str], None]
    batcher: Batcher
    val_batcher: Optional[Batcher]
    steps: int
    result: TrainResult
    frozen: bool = True
    optimizer: Optional[optim.Optimizer] = None
    log_file: Optional[LossLog] = None
    consumed: int = 0  # microbatches of the stream used so far (all processes)
    window: List[float] = field(default_factory=lambda: [0.0, 0.0, 0, 0.0])  # ce, answer tokens, inputs, seconds
    callback: Optional[object] = None  # an mlx-lm TrainingCallback (process 0 only)
    trained_tokens: int = 0  # input tokens reported so far (all processes), as mlx-lm counts them
    last_report: int = 0  # the step of the last loss report
    preference: Optional[PreferenceConfig] = None
    metric_window: List[float] = field(default_factory=lambda: [0.0] * len(METRICS))  # preference metric sums
    reference: Optional[object] = None  # where DPO/MPO's reference log-probs come from (reference.py)
    loss: Callable = loss_sum  # SFT's, or a ViCO stage's (vico.py)
    batcher_mode: Optional[str] = None  # the ViCO stage the batchers were made for

    @property
    def rank(self) -> int:
        return self.group.rank()

    @property
    def world(self) -> int:
        return self.group.size()


def train(model, processor, train_data: Dataset, adapter_path, lora: LoraConfig, args: TrainingArgs = None,
          val_data: Optional[Dataset] = None, resume: bool = False, base_model: Optional[str] = None,
          on_step: Optional[Callable[[int, dict], None]] = None, log: Callable[[str], None] = print,
          training_callback=None, preference: Optional[PreferenceConfig] = None,
          reference_loader: Optional[Callable[[], nn.Module]] = None) -> TrainResult:
    """Fine-tune `model` (loaded with `mlx_internvl.load`) and write adapters and checkpoints to `adapter_path`.
    `training_callback` (an mlx-lm `TrainingCallback`, e.g. from `mlx_lm.tuner.callbacks.get_reporting_callbacks`)
    gets every loss report and validation with mlx-lm's keys, on process 0. With `preference`, `train_data` holds
    preference pairs (`load_dataset(..., parse=pairs.parse_pair)`, `val_data` too) and the objective is DPO/MPO/ORPO;
    `reference_loader` returns the `--reference-model` (default: the model with its adapters off)."""
    args = args or TrainingArgs()
    check_training_args(args)
    lora.validate()
    if preference is not None:
        check_preference_setup(preference, lora)
    run = _prepare(model, processor, train_data, val_data, Path(adapter_path).expanduser(), args, log, preference,
                   lora.train_flash)
    lora = _start(run, processor, lora, resume, base_model)
    run.loss = setup_flash(run, lora) or loss_sum
    run.callback = training_callback if run.rank == 0 else None
    run.last_report = run.result.start_step
    if preference is None:
        step_fn, state = make_step(model, run.optimizer, run.frozen, args.compile, run.loss)
    else:
        init_preference_state(preference, run.optimizer)
        run.reference = make_reference(run, reference_loader)
        step_fn, state = make_preference_step(model, run.optimizer, preference, training_logits, run.frozen,
                                              args.compile, run.world)
    mx.reset_peak_memory()
    model.train()
    if run.val_batcher is not None and run.result.start_step == 0:
        validate(run, 0)
    bar = tqdm(total=run.steps, initial=run.result.start_step, disable=run.rank != 0, dynamic_ncols=True,
               desc="lora")
    try:
        with grad_checkpointing(layer_types(model, lora) if args.grad_checkpoint else ()):
            for s in range(run.result.start_step + 1, run.steps + 1):
                tic = time.perf_counter()
                ce_sum, answer_tokens = (_optimizer_step(run, step_fn, state) if preference is None else
                                         preference_optimizer_step(run, step_fn, state))
                step_ce = ce_sum.item()
                if not math.isfinite(step_ce):
                    stop_diverged(s, f"the training loss is {step_ce / answer_tokens}", run.out)
                run.window[:2] = [run.window[0] + step_ce, run.window[1] + answer_tokens]
                run.window[3] += time.perf_counter() - tic
                bar.update(1)
                _after_step(run, s, bar)
                if on_step is not None:
                    on_step(s, {"loss": step_ce / answer_tokens, "answer_tokens": answer_tokens})
    finally:
        bar.close()  # an error message then starts on a line of its own
    model.eval()
    run.say(f"Adapters: {run.out / 'adapters.safetensors'} (step {run.steps}); loss curve: {run.out / 'loss.csv'}, "
            f"{run.out / 'loss.png'}")
    return run.result


def _prepare(model, processor, train_data, val_data, out: Path, args: TrainingArgs, log, preference=None,
             flash=None) -> Run:
    """Encode and batch the data (refusing bad samples unless --skip-bad), and size the run."""
    group = mx.distributed.init()
    say = log if group.rank() == 0 else (lambda *_: None)
    encode, batcher_cls = (encode_dataset, Batcher) if preference is None else (encode_pairs, PairBatcher)
    if flash and preference is None:
        batcher_cls = partial(FlashBatcher, mode=flash)
    encoded, problems, truncated = encode(train_data, processor, args)
    report_problems("training data", problems, encoded, args.skip_bad, say)
    if truncated:
        say(f"{truncated} training sample(s) were cut to --max-length {args.max_length} (after their images).")
    val_batcher = None
    if val_data is not None:
        val_enc, val_problems, _ = encode(val_data, processor, args)
        report_problems("validation data", val_problems, val_enc, args.skip_bad, say)
        val_batcher = batcher_cls(val_enc, args.batch_size, processor.config, pad_id(processor),
                              processor.image_token_id, shuffle=False)
    batcher = batcher_cls(encoded, args.batch_size, processor.config, pad_id(processor), processor.image_token_id,
                          seed=args.seed)
    steps = total_steps(args, len(batcher), group.size())
    result = TrainResult(out, steps, 0, skipped=problems, truncated=truncated)
    return Run(model, args, out, group, say, batcher, val_batcher, steps, result, preference=preference,
               batcher_mode=flash if preference is None else None)


def _start(run: Run, processor, lora: LoraConfig, resume: bool, base_model: Optional[str]) -> LoraConfig:
    """Add the adapters and the optimizer, from the last checkpoint when resuming. Returns the adapter layout."""
    out, args, say, model = run.out, run.args, run.say, run.model
    check_writable_dir(out, "--adapter-path directory")
    sweep_stale(out / "checkpoints", every=True)
    checkpoint = latest_checkpoint(out, log=say)
    if checkpoint is not None and not resume:
        raise UserError(f"{out} already holds a training run (up to {checkpoint.name}). Pass --resume to continue "
                        "it, or choose a new --adapter-path.")
    if resume and checkpoint is None:
        say(f"--resume: no checkpoint in {out} yet; starting from step 0.")
    if checkpoint is not None:
        # The adapter layout is the one the run started with; LoRA options given now do not apply.
        lora = LoraConfig.from_json(read_adapter_config(out))
    mx.random.seed(args.seed)  # LoRA A-matrix init: the same on every process
    targets = apply_lora(model, lora)
    lora.targets, lora.num_layers = targets, lora.num_layers or len(model.language_model.layers)
    run.frozen = not (lora.train_vision or lora.train_projector)
    n_train = sum(v.size for v in trainable_weights(model).values())
    run.optimizer = make_optimizer(args, run.steps)
    run.optimizer.init(model.trainable_parameters())
    if run.rank == 0:
        with output_errors(out, "--adapter-path directory"):
            out.mkdir(parents=True, exist_ok=True)  # only now: a run refused above leaves nothing behind
    settings = dict(asdict(args), world_size=run.world,
                    preference=run.preference.to_json() if run.preference is not None else None,
                    flash=_flash_settings(lora, args))
    if checkpoint is not None:
        state = load_checkpoint(checkpoint, model, run.optimizer)
        _check_same_stream(state["settings"], settings, checkpoint)
        run.result.start_step, run.consumed = state["step"], state["microbatches"]
        say(f"Resuming from {checkpoint} (step {state['step']}, {state['microbatches']} microbatches consumed).")
    elif run.rank == 0:
        save_json(out / CONFIG_FILE, lora.to_json(base_model=base_model,
                                                  base_quantization=processor.config.quantization))
    run.settings = settings
    run.log_file = LossLog(out, enabled=run.rank == 0, extra=METRICS if run.preference is not None else ())
    run.log_file.start(run.result.start_step)
    say(f"Training {n_train / 1e6:.3f}M parameters ({', '.join(targets) or 'no LLM adapters'}"
        f"{'; vision LoRA' if lora.train_vision else ''}"
        f"{'; projector ' + lora.train_projector if lora.train_projector else ''}"
        f"{'; Flash ' + lora.train_flash + ' (ViCO)' if lora.train_flash else ''}) on "
        f"{len(run.batcher.samples)} samples, {len(run.batcher)} microbatches/epoch, {run.steps} steps x "
        f"{args.grad_accum} accumulation x {run.world} process(es).")
    return lora


def _optimizer_step(run: Run, step_fn, state):
    """One optimizer step over this process's microbatches of the stream. Returns (summed ce, answer tokens),
    both over all processes."""
    args, world = run.args, run.world
    first, per_step = run.consumed, args.grad_accum * world
    answer_tokens = sum(run.batcher.loss_tokens(first + j) for j in range(per_step))
    if answer_tokens == 0:
        raise UserError(f"microbatches {first}..{first + per_step - 1} have no answer tokens")
    scale = mx.array(world / answer_tokens, dtype=mx.float32)
    grad, ce_sum = None, mx.array(0.0)
    for j in range(args.grad_accum):
        k = first + j * world + run.rank
        batch, n_inputs = run.batcher.batch(k)
        mx.random.seed(args.seed * 1_000_003 + k + 1)  # dropout masks depend on the microbatch only
        ce, _, grad = step_fn(batch, grad, j == args.grad_accum - 1, scale)
        ce_sum = ce_sum + ce
        mx.eval(state, ce_sum, grad)
        run.window[2] += n_inputs
    run.consumed = first + per_step
    if world > 1:
        ce_sum = mx.distributed.all_sum(ce_sum, stream=mx.cpu)
    return ce_sum, answer_tokens


def _after_step(run: Run, s: int, bar) -> None:
    """Report the loss window, validate and save a checkpoint when their step comes."""
    args, result = run.args, run.result
    if s % args.report_every == 0 or s == run.steps:
        ce, tokens, inputs, seconds = run.window
        result.train_loss = ce / tokens
        result.tokens_per_second = inputs * run.world / seconds
        result.peak_memory_gb = mx.get_peak_memory() / 1e9
        lr = float(run.optimizer.learning_rate.item())
        bar.set_postfix(loss=f"{result.train_loss:.3f}", tok_s=f"{result.tokens_per_second:.0f}",
                        peak_gb=f"{result.peak_memory_gb:.2f}")
        metrics = metrics_dict(run.metric_window, tokens) if run.preference is not None else {}
        run.metric_window = [0.0] * len(METRICS)
        run.log_file.add(step=s, split="train", loss=f"{result.train_loss:.6f}", learning_rate=f"{lr:.3e}",
                         tokens_per_second=f"{result.tokens_per_second:.1f}",
                         peak_memory_gb=f"{result.peak_memory_gb:.3f}", **{k: f"{v:.6f}" for k, v in metrics.items()})
        run.trained_tokens += inputs * run.world
        if run.callback is not None:  # mlx-lm's keys, as its own trainer reports them
            run.callback.on_train_loss_report({
                "iteration": s, "train_loss": result.train_loss, "learning_rate": lr,
                "iterations_per_second": (s - run.last_report) / seconds,
                "tokens_per_second": result.tokens_per_second, "trained_tokens": run.trained_tokens,
                "peak_memory": result.peak_memory_gb, **metrics})
        run.last_report = s
        run.window = [0.0, 0.0, 0, 0.0]
    if run.val_batcher is not None and ((args.val_every and s % args.val_every == 0) or s == run.steps):
        validate(run, s, bar)
    if s % args.save_every == 0 or s == run.steps:
        if not adapters_finite(run.model):
            stop_diverged(s, "the update made an adapter weight NaN or infinite", run.out)
        if run.rank == 0:
            save_checkpoint(run.out, run.model, run.optimizer, s, run.consumed, run.settings, args.keep_checkpoints)
            run.log_file.plot()
        if run.world > 1:
            mx.eval(mx.distributed.all_sum(mx.array(0.0), stream=mx.cpu))  # wait for rank 0's save


def _flash_settings(lora: LoraConfig, args: TrainingArgs) -> Optional[dict]:
    if not lora.train_flash:
        return None
    if lora.train_flash == "mlp2":
        return {"stage": "mlp2"}
    return {"stage": "router", "percentile": args.flash_percentile, "window": args.flash_window}


def _check_same_stream(saved: dict, now: dict, where: Path) -> None:
    diff = [f"{k}: {saved.get(k)} then, {now.get(k)} now" for k in STREAM_SETTINGS if saved.get(k) != now.get(k)]
    if diff:
        raise UserError(f"--resume from {where}: these settings changed, so the run cannot continue where it stopped "
                        f"({'; '.join(diff)}). Use the original values, or a new --adapter-path.")
