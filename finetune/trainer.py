"""The training loop (stages align and instruct): accelerate for devices and processes, a loop
anyone can read, and checkpoints that make a killed run resume exactly where it stopped."""

from __future__ import annotations

import json
import math
import random
import time
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from peft.helpers import disable_input_dtype_casting
from tqdm import tqdm

from assistant.weights.checkpoint import load_checkpoint, save_checkpoint
from assistant.cpu.policy import has_accelerator, training_precision

from .config import TrainConfig
from .curves import plot_curves
from .data import load_samples
from .dataset import Collator, InstructionDataset
from .evaluate import evaluate
from .schedule import TrainingClock, make_scheduler, out_of_time
from .model_setup import parameter_groups, prepare_model
from .replay import ReplayData, default_replay, load_replay, mix, token_estimate, wanted
from .skills import check_skills, load_before, report, save_skills
from .state import (atomic_directory, latest_checkpoint, optimizer_from_files, optimizer_to_files, prune_checkpoints,
                    rng_from_files, rng_to_files)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def load_data(cfg: TrainConfig, processor, log, replay: ReplayData | None = None):
    """Train / eval datasets; invalid samples stop the run unless skip_invalid (ids listed in the output).
    Replay samples join the training set after the held-out part is taken, so evaluation stays on your data."""
    samples, errors = load_samples(cfg.data.train)
    roots = [cfg.data.image_root] * len(samples)
    for path, image_root, repeat in cfg.data.extra_sources():
        more, more_errors = load_samples(path)
        more = more * repeat  # e.g. a small text-only set seen several times
        samples += more
        roots += [image_root] * len(more)
        errors += more_errors
    if errors:
        shown = "\n  ".join(str(e) for e in errors[:20])
        more = f"\n  ... and {len(errors) - 20} more" if len(errors) > 20 else ""
        if not cfg.data.skip_invalid:
            raise SystemExit(f"{len(errors)} problem(s) in the training data:\n  {shown}{more}\n"
                             "Fix them, run `python -m finetune.validate`, or pass data.skip_invalid=true.")
        log(f"skipping {len(errors)} invalid sample(s) (data.skip_invalid):\n  {shown}{more}")
    eval_samples, eval_roots = [], []
    if cfg.data.eval:
        eval_samples, eval_errors = load_samples(cfg.data.eval)
        eval_roots = [cfg.data.image_root] * len(eval_samples)
    elif cfg.data.eval_fraction > 0:
        order = list(range(len(samples)))
        random.Random(cfg.train.seed).shuffle(order)
        n_eval = max(1, int(len(samples) * cfg.data.eval_fraction))
        held = set(order[:n_eval])
        eval_samples = [s for i, s in enumerate(samples) if i in held]
        eval_roots = [r for i, r in enumerate(roots) if i in held]
        samples = [s for i, s in enumerate(samples) if i not in held]
        roots = [r for i, r in enumerate(roots) if i not in held]
    eval_samples, eval_roots = eval_samples[:cfg.data.eval_max_samples], eval_roots[:cfg.data.eval_max_samples]
    if replay is not None and replay.samples:
        samples, roots, n_replay = mix(samples, roots, replay, cfg.data.replay_share, cfg.train.seed,
                                       token_estimate(processor))
        log(f"replay: {n_replay} samples of {replay.name} data mixed in ({cfg.data.replay_share:.0%} of the "
            f"training tokens, {n_replay} of {len(samples)} samples)")
    train = InstructionDataset(samples, roots, processor, cfg.data.max_length)
    evaluation = InstructionDataset(eval_samples, eval_roots, processor, cfg.data.max_length) if eval_samples else None
    return train, evaluation, errors


def micro_batches(n_samples: int, batch_size: int, world: int, rank: int, seed: int, epoch: int):
    """Deterministic order for one epoch: this process's index list for every micro-batch."""
    g = torch.Generator().manual_seed(seed * 1000 + epoch)
    order = torch.randperm(n_samples, generator=g).tolist()
    per_step = batch_size * world
    return [order[k:k + per_step][rank * batch_size:(rank + 1) * batch_size] for k in range(0, n_samples, per_step)]


def epoch_batches(dataset, collate, index_lists: list[list[int]], num_workers: int):
    """Collated micro-batches in the given order; with workers, read and preprocessed ahead of the GPU."""
    if num_workers <= 0:
        return (collate([dataset[i] for i in ids]) for ids in index_lists)
    return iter(torch.utils.data.DataLoader(dataset, batch_sampler=index_lists, collate_fn=collate,
                                            num_workers=num_workers, pin_memory=torch.cuda.is_available(),
                                            prefetch_factor=4))


def make_accelerator(t) -> Accelerator:
    if t.num_threads:
        torch.set_num_threads(t.num_threads)
    if torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True  # fp32 leftovers (norms, loss) on tensor cores
    return Accelerator(gradient_accumulation_steps=t.grad_accum, cpu=not has_accelerator(),
                       mixed_precision=training_precision(t.mixed_precision))


def train(cfg: TrainConfig, resume: bool = False) -> Path:
    cfg.validate()
    t = cfg.train
    accelerator = make_accelerator(t)
    out = Path(t.output_dir)
    is_main = accelerator.is_main_process
    if is_main:
        out.mkdir(parents=True, exist_ok=True)
    log_file = out / "train_log.jsonl"

    def log(message: str) -> None:
        if is_main:
            tqdm.write(message)

    def record(entry: dict) -> None:
        if is_main:
            with open(log_file, "a") as f:
                f.write(json.dumps(entry) + "\n")

    seed_everything(t.seed)
    checkpoint = latest_checkpoint(out)
    if checkpoint is not None and not resume:
        log(f"found {checkpoint}: resuming from it (a checkpoint in the output dir always resumes)")
    model, processor = prepare_model(cfg)
    replay = starting_skills_data(cfg, log)
    train_set, eval_set, _ = load_data(cfg, processor, log, replay)
    if len(train_set) == 0:
        raise SystemExit("no training samples left")
    # before the training clock starts: the check is not part of the time budget
    skills_file = out / "skills.json"
    skills_before = load_before(skills_file) if replay is not None and cfg.data.skill_check else None
    if replay is not None and cfg.data.skill_check and skills_before is None and is_main:
        log("checking the starting model's skills (data.skill_check) ...")
        skills_before = check_skills(model, processor, replay, cfg.data.max_length)
        save_skills(skills_file, skills_before)
    per_epoch = math.ceil(len(train_set) / (t.batch_size * accelerator.num_processes))
    by_time = t.schedule == "minutes" and not t.max_steps  # the time budget ends the run, not the epochs
    total_steps = t.max_steps or (UNBOUNDED if by_time else max(1, math.ceil(per_epoch * t.epochs / t.grad_accum)))
    optimizer = torch.optim.AdamW(parameter_groups(model, cfg), weight_decay=t.weight_decay)
    clock = TrainingClock()
    scheduler = make_scheduler(optimizer, t, total_steps, clock)
    step, micro_step = 0, 0
    until = (f"until {t.max_minutes:g} minutes of training" if by_time else
             f"until {t.max_minutes:g} minutes of training or step {total_steps}, whichever comes first"
             if t.max_minutes else f"for {total_steps} steps")
    if checkpoint is not None:
        step, micro_step = _restore(checkpoint, model, optimizer, scheduler, accelerator.process_index, clock)
        if is_main:
            _cut_log(log_file, step)  # the steps after the checkpoint are trained again: their rows go
        log(f"resumed at step {step} from {checkpoint}; training {until}")
    elif is_main:
        (out / "train_config.json").write_text(json.dumps(cfg.to_dict(), indent=2))
        log(f"training {sum(p.numel() for g in optimizer.param_groups for p in g['params']):,} parameters on "
            f"{len(train_set)} samples {until} ({accelerator.num_processes} process(es), "
            f"{precision_name(t.mixed_precision)})")
    model, optimizer = accelerator.prepare(model, optimizer)
    collate = Collator(processor)
    model.train()
    window_loss, window_n, window_tokens, window_start = 0.0, 0, 0, time.time()
    skipped = {"skipped_too_long": 0, "skipped_bad_image": 0, "turns_truncated": 0, "last_error": None}
    batch_iter, iter_epoch = None, None
    progress = training_progress(t, total_steps, step, clock, disable=not is_main)
    while step < total_steps:
        epoch, index_in_epoch = divmod(micro_step, per_epoch)
        if iter_epoch != epoch:  # a new epoch (or a resume part-way into one): its order from here on
            order = micro_batches(len(train_set), t.batch_size, accelerator.num_processes,
                                  accelerator.process_index, t.seed, epoch)[index_in_epoch:]
            batch_iter, iter_epoch = epoch_batches(train_set, collate, order, cfg.data.num_workers), epoch
        batch = next(batch_iter, None)
        micro_step += 1
        if batch is not None:
            for key, value in batch.pop("skipped").items():
                if key != "last_error":
                    skipped[key] += value
                elif value:
                    skipped[key] = value
            if "input_ids" not in batch:
                batch = None
        with accelerator.accumulate(model):
            if batch is None:  # every sample in it was skipped (bad images, too long): keep processes in step
                loss = sum(p.sum() * 0.0 for p in model.parameters() if p.requires_grad)
            else:
                batch.pop("num_label_tokens")  # the model's loss already averages over labelled tokens
                # under autocast peft's cast of each LoRA input to the adapter's fp32 is undone by the next product
                with disable_input_dtype_casting(model, active=accelerator.mixed_precision != "no"):
                    loss = model(**batch).loss
            accelerator.backward(loss)
            if accelerator.sync_gradients:
                if t.max_grad_norm:
                    accelerator.clip_grad_norm_([p for g in optimizer.param_groups for p in g["params"]],
                                                t.max_grad_norm)
                optimizer.step()
                clock.tick(accelerator)
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
        if batch is not None:
            window_loss += float(loss.detach())
            window_n += 1
            window_tokens += int(batch["attention_mask"].sum())
        if not accelerator.sync_gradients:
            continue
        step += 1
        advance(progress, t, clock)
        stop = out_of_time(t, clock)
        if step % t.log_every == 0 or step == total_steps or stop:  # the last step is always logged
            elapsed = time.time() - window_start
            entry = {"step": step, "loss": window_loss / max(window_n, 1), "lr": scheduler.get_last_lr()[0],
                     "tokens_per_s": window_tokens * accelerator.num_processes / max(elapsed, 1e-9),
                     "epoch": micro_step / per_epoch, "elapsed_s": clock.seconds(),
                     **{k: v for k, v in skipped.items() if isinstance(v, int)}}
            record(entry)
            progress.set_postfix(step=step, loss=f"{entry['loss']:.4f}", tok_s=f"{entry['tokens_per_s']:.0f}")
            window_loss, window_n, window_tokens, window_start = 0.0, 0, 0, time.time()
        if eval_set is not None and t.eval_every and (step % t.eval_every == 0 or step == total_steps or stop):
            if is_main:
                try:
                    metrics = evaluate(accelerator.unwrap_model(model), processor, eval_set)
                except Exception as e:  # noqa: BLE001 - a failed evaluation must not end hours of training
                    record({"step": step, "eval_error": f"{type(e).__name__}: {e}"})
                    log(f"step {step}: evaluation failed ({type(e).__name__}: {e}); training goes on")
                else:
                    record({"step": step, **{f"eval_{k}": v for k, v in metrics.items()}})
                    log(f"step {step}: " + ", ".join(f"{k} {v:.4g}" for k, v in metrics.items()))
            accelerator.wait_for_everyone()
            model.train()
        if step % t.save_every == 0 or stop:
            _save(accelerator, model, processor, optimizer, scheduler, out, step, micro_step, cfg, clock)
        if stop:
            log(f"stopping after {t.max_minutes} minutes (train.max_minutes) at step {step}")
            break
    progress.close()
    if skipped["skipped_bad_image"] or skipped["skipped_too_long"]:
        log(f"skipped {skipped['skipped_bad_image']} sample(s) with unreadable images and "
            f"{skipped['skipped_too_long']} too long for data.max_length (last: {skipped['last_error']})")
    accelerator.wait_for_everyone()
    if is_main:
        unwrapped = accelerator.unwrap_model(model)
        save_checkpoint(unwrapped, processor, out, save_llm=cfg.llm == "full")
        plot_curves(log_file, out / "training_curves.png")
        if skills_before is not None:
            skills_after = check_skills(unwrapped, processor, replay, cfg.data.max_length)
            save_skills(skills_file, skills_before, skills_after)
            record({"step": step, "skills_before": _accuracies(skills_before),
                    "skills_after": _accuracies(skills_after)})
            log(report(skills_before, skills_after, replayed=bool(replay.samples)))
        log(f"model written to {out} (serve it with: python serve.py --model {out})")
    accelerator.wait_for_everyone()
    return out


def starting_skills_data(cfg: TrainConfig, log) -> ReplayData | None:
    """The replay data (data.replay), or, for the default model without replay, its held-out data alone so the
    skill check still runs; None when there is neither."""
    if wanted(cfg.data.replay):
        return load_replay(cfg.data.replay, cfg.data.replay_image_root, cfg.train.seed, log)
    if cfg.data.skill_check and cfg.init == "default" and cfg.stage == "instruct":
        return default_replay(log, pool=False)
    return None


def _accuracies(skills: dict) -> dict:
    return {name: s.get("accuracy", s.get("loss")) for name, s in skills.items()}


UNBOUNDED = 10**12  # steps of a run that only its time budget ends


def precision_name(setting: str) -> str:
    precision = training_precision(setting)
    return "fp32" if precision == "no" else precision


def training_progress(t, total_steps: int, step: int, clock: TrainingClock, disable: bool) -> tqdm:
    """A progress bar in steps, or, under a time budget (train.max_minutes), in minutes used and left: the steps
    an epoch count implies say nothing about when such a run ends."""
    if t.max_minutes:
        return tqdm(total=t.max_minutes * 60, initial=clock.seconds(), disable=disable, desc="training",
                    dynamic_ncols=True, bar_format="{desc}: {percentage:3.0f}%|{bar}| {n:.0f}/{total:.0f} s of the "
                    "time budget [{elapsed}<{remaining}{postfix}]")
    return tqdm(total=total_steps, initial=step, disable=disable, desc="training", dynamic_ncols=True)


def advance(progress: tqdm, t, clock: TrainingClock) -> None:
    """One step done: under a budget the bar counts seconds, never past the budget (a tqdm bar drawn beyond its total
    fails to format, which ended runs at their last step)."""
    progress.update(min(clock.seconds(), progress.total) - progress.n if t.max_minutes else 1)


def _cut_log(log_file: Path, step: int) -> None:
    """Drop the log rows of steps after `step` (written before a crash, about to be trained again)."""
    if not log_file.is_file():
        return
    kept = []
    for line in log_file.read_text().splitlines():
        try:
            if json.loads(line).get("step", 0) <= step:
                kept.append(line)
        except json.JSONDecodeError:  # a row cut off by the kill
            continue
    log_file.write_text("".join(line + "\n" for line in kept))


def _save(accelerator, model, processor, optimizer, scheduler, out: Path, step: int, micro_step: int, cfg,
          clock: TrainingClock) -> None:
    """An atomic training checkpoint: model, optimizer, scheduler, RNG of every process, data position."""
    name = f"step-{step:07d}"
    tmp_rng = out / "checkpoints" / f".rng-{name}"
    if accelerator.num_processes > 1:
        tmp_rng.mkdir(parents=True, exist_ok=True)
        rng_to_files(tmp_rng, accelerator.process_index)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        with atomic_directory(out / "checkpoints", name) as tmp:
            save_checkpoint(accelerator.unwrap_model(model), processor, tmp / "model", save_llm=cfg.llm == "full")
            optimizer_to_files(optimizer.optimizer if hasattr(optimizer, "optimizer") else optimizer, tmp)
            if accelerator.num_processes > 1:
                for f in tmp_rng.iterdir():
                    f.replace(tmp / f.name)
                tmp_rng.rmdir()
            else:
                rng_to_files(tmp, 0)
            (tmp / "trainer_state.json").write_text(json.dumps({
                "step": step, "micro_step": micro_step, "scheduler": scheduler.state_dict(),
                "train_seconds": clock.seconds(),
                "num_processes": accelerator.num_processes}))
        prune_checkpoints(out, cfg.train.keep_checkpoints)
    accelerator.wait_for_everyone()


def _restore(checkpoint: Path, model, optimizer, scheduler, rank: int, clock: TrainingClock) -> tuple[int, int]:
    saved, _ = load_checkpoint(checkpoint / "model")
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    state = {k: v for k, v in saved.state_dict().items()}
    missing = [n for n in trainable if n not in state]
    if missing:
        raise SystemExit(f"{checkpoint}: does not match this recipe (missing {missing[:3]})")
    model.load_state_dict({k: v for k, v in state.items() if k in dict(model.named_parameters())}, strict=False)
    optimizer_from_files(optimizer, checkpoint)
    meta = json.loads((checkpoint / "trainer_state.json").read_text())
    scheduler.load_state_dict(meta["scheduler"])
    clock.resume_at(meta.get("train_seconds", 0.0))
    rng_from_files(checkpoint, rank)
    return meta["step"], meta["micro_step"]
