"""Saving and resuming for every trainer (`SavingMixin`, mixed into `VLMTrainer`).

* `save_model` / `_save`: a folder that loads with `from_pretrained` from every engine (FSDP sharded state dicts and
  ZeRO-3 gathered to the main process), the processor beside the weights, no pickle left behind;
* atomic checkpoints (checkpoint.py): written under ``.tmp-checkpoint-N/`` and renamed to ``checkpoint-N`` when
  complete, subclass additions included (any `_save_checkpoint` override is wrapped, see `__init_subclass__`);
* counters a resumed run needs (`_resumable_attrs`) saved in ``vlmalign_state.json`` in each checkpoint, and
  weights loaded with the model's key conversion on resume;
* the output folder's lock and run identity (run_dir.py), claimed at the start of `train`.
"""

from __future__ import annotations

import errno
import functools
import json
import logging
import os
import shutil

from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from .engines.gather import zero3_engine
from ..models.forward import unwrap_model
from ..models.loading import save_processor
from . import checkpoint as ckpt
from . import run_dir as runs

logger = logging.getLogger(__name__)

VLMALIGN_STATE_NAME = "vlmalign_state.json"
TRAINING_ARGS_NAME = "training_args.bin"   # what Trainer writes (a pickle); replaced by:
TRAINING_ARGS_JSON = "training_args.json"
PICKLE_WEIGHT_FILES = ("pytorch_model.bin", "pytorch_model.bin.index.json", "adapter_model.bin")


def _atomic_checkpoint(save_checkpoint):
    """Make a `_save_checkpoint` implementation atomic. The outermost call (the most derived override, which
    Trainer calls) stages the whole save, its `super()` chain and additions included; inner calls pass through."""
    if getattr(save_checkpoint, "_vlmalign_atomic", False):
        return save_checkpoint

    @functools.wraps(save_checkpoint)
    def wrapper(self, model, trial, *args, **kwargs):
        if getattr(self, "_ckpt_staging", None) is not None:
            return save_checkpoint(self, model, trial, *args, **kwargs)
        return self._staged_save(functools.partial(save_checkpoint, self, model, trial, *args, **kwargs), trial)

    wrapper._vlmalign_atomic = True
    return wrapper


class SavingMixin:
    """Model saving, atomic checkpoints and resuming of `VLMTrainer` (see the module docstring)."""

    _resumable_attrs: tuple[str, ...] = ()
    _ckpt_staging: str | None = None

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        own = cls.__dict__.get("_save_checkpoint")
        if own is not None:
            cls._save_checkpoint = _atomic_checkpoint(own)

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """`Trainer.save_model`, so that the folder loads with `from_pretrained` (config, processor and full weights;
        the adapter under PEFT) from every engine: under FSDP with ``SHARDED_STATE_DICT`` (where transformers writes
        nothing) and under ZeRO-3 the full weights are gathered to the main process. Checkpoints keep the engine's
        own sharded files for resuming as well."""
        if self.is_fsdp_enabled and "FULL_STATE_DICT" not in str(self.accelerator.state.fsdp_plugin.state_dict_type):
            output_dir = output_dir or self.args.output_dir
            state_dict = self.accelerator.get_state_dict(self.model)   # collective: every process takes part
            self._save(output_dir, state_dict=state_dict)
            if self.args.push_to_hub and not _internal_call:
                self.push_to_hub(commit_message="Model save", revision=self.args.hub_revision)
            return
        engine = zero3_engine(self.accelerator)
        if engine is not None:
            # Gather and save the model's own state_dict (also with stage3_gather_16bit_weights_on_model_save off).
            import deepspeed

            output_dir = output_dir or self.args.output_dir
            with deepspeed.zero.GatheredParameters(list(engine.module.parameters())):
                state_dict = ({k: v.detach().clone() for k, v in engine.module.state_dict().items()}
                              if self.args.should_save else None)
            if self.args.should_save:
                # A model loaded under zero.Init records weight conversions that, reverted at save time, put an
                # extra prefix on every key (model.model.embed_tokens): save with the family's default mapping.
                base = unwrap_model(engine.module)
                recorded = base.__dict__.pop("_weight_conversions", None)
                try:
                    self._save(output_dir, state_dict=state_dict)
                finally:
                    if recorded is not None:
                        base._weight_conversions = recorded
            if self.args.push_to_hub and not _internal_call:
                self.push_to_hub(commit_message="Model save", revision=self.args.hub_revision)
            return
        super().save_model(output_dir, _internal_call)

    def _save(self, output_dir: str | None = None, state_dict=None):
        super()._save(output_dir, state_dict)
        output_dir = output_dir or self.args.output_dir
        if not self.args.should_save:
            return
        # Trainer pickles the whole TrainingArguments object as training_args.bin: keep a JSON copy instead, so no
        # pickle file is left in any output folder.
        pickled = os.path.join(output_dir, TRAINING_ARGS_NAME)
        if os.path.isfile(pickled):
            os.remove(pickled)
        with open(os.path.join(output_dir, TRAINING_ARGS_JSON), "w", encoding="utf-8") as f:
            f.write(self.args.to_json_string())
        save_processor(self.processing_class, output_dir, self.family)
        stale = [name for name in PICKLE_WEIGHT_FILES if os.path.exists(os.path.join(output_dir, name))]
        if stale:  # transformers 5 writes safetensors only: these come from an earlier run in the same directory
            logger.warning("%s holds pickle weight files not written by this save: %s", output_dir, stale)

    def _claim_output_dir(self, resume_from_checkpoint):
        """Lock the output folder, pick and check the checkpoint to resume from, and fix this run's identity
        (run_dir.py). Decided on the main process; every process raises the same error."""
        error, resolved, run_id = None, resume_from_checkpoint, None
        if self.args.should_save:
            try:
                out = self.args.output_dir
                self._run_lock = runs.acquire_lock(out, "pending")
                ckpt.remove_stale_staging(out, " at the start of training")
                need_optimizer = not (self.args.save_only_model or self.is_deepspeed_enabled or self.is_fsdp_enabled)
                resolved, run_id = runs.resolve_resume(
                    out, resume_from_checkpoint, unwrap_model(self.model).config, need_optimizer=need_optimizer,
                    overwrite=getattr(self.args, "overwrite_output_dir", False))
                runs.update_lock(self._run_lock, run_id)
            except (runs.OutputDirInUseError, ckpt.CheckpointMismatchError, ValueError) as e:
                if self._run_lock is not None:
                    runs.release_lock(self._run_lock, "pending")
                    self._run_lock = None
                error = e
        if self.accelerator.num_processes > 1:
            from accelerate.utils import broadcast_object_list
            shared = [None if error is None else (type(error), str(error)), resolved, run_id]
            broadcast_object_list(shared)
            error = error if error is not None or shared[0] is None else shared[0][0](shared[0][1])
            resolved, run_id = shared[1], shared[2]
        self.accelerator.wait_for_everyone()
        if error is not None:
            raise error
        self.run_id = run_id
        return resolved

    def _resumable_state(self) -> dict:
        state = {"nonfinite_skipped": self._guard.skipped, "run_id": getattr(self, "run_id", None)}
        state.update({name: getattr(self, name) for name in self._resumable_attrs if hasattr(self, name)})
        return state

    @_atomic_checkpoint
    def _save_checkpoint(self, model, trial):
        super()._save_checkpoint(model, trial)
        if self.args.should_save:
            folder = os.path.join(self._get_output_dir(trial=trial), f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}")
            os.makedirs(folder, exist_ok=True)
            with open(os.path.join(folder, VLMALIGN_STATE_NAME), "w", encoding="utf-8") as f:
                json.dump(self._resumable_state(), f, indent=2, sort_keys=True)

    def _load_optimizer_and_scheduler(self, checkpoint):
        # Called on every resume path (plain, DDP, FSDP, DeepSpeed).
        super()._load_optimizer_and_scheduler(checkpoint)
        path = os.path.join(checkpoint, VLMALIGN_STATE_NAME) if checkpoint else None
        if path and os.path.isfile(path):
            with open(path, encoding="utf-8") as f:
                state = json.load(f)
            self._guard.skipped = int(state.pop("nonfinite_skipped", 0))
            state.pop("run_id", None)
            for name, value in state.items():
                if name in self._resumable_attrs:
                    setattr(self, name, value)

    def _plain_pretrained_model(self, model=None):
        """The unwrapped model when it is a plain (non-PEFT) PreTrainedModel trained without FSDP / DeepSpeed."""
        from transformers import PreTrainedModel

        if self.is_deepspeed_enabled or self.is_fsdp_enabled:
            return None
        model = self.accelerator.unwrap_model(model if model is not None else self.model)
        return model if isinstance(model, PreTrainedModel) else None

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        # transformers 5.23 resumes with a raw load_state_dict of a file saved in the hub key layout: for models
        # with a conversion mapping (Qwen2-VL, LLaVA, Gemma3, ...) nothing loads (see checkpoint.needs_key_conversion).
        target = self._plain_pretrained_model(model)
        if target is not None and ckpt.needs_key_conversion(target, resume_from_checkpoint):
            logger.info("Loading model weights from %s with the model's key conversion", resume_from_checkpoint)
            ckpt.load_converted_weights(target, resume_from_checkpoint)
            return
        super()._load_from_checkpoint(resume_from_checkpoint, model)

    def _load_best_model(self):
        best = self.state.best_model_checkpoint
        target = self._plain_pretrained_model()
        if best and target is not None and ckpt.needs_key_conversion(target, best):
            logger.info("Loading best model from %s (score: %s) with the model's key conversion", best,
                        self.state.best_metric)
            ckpt.load_converted_weights(target, best)
            return
        super()._load_best_model()

    def _get_output_dir(self, trial) -> str:
        # While a checkpoint is being written, Trainer (and subclass overrides) build its folder as
        # os.path.join(self._get_output_dir(trial), "checkpoint-N"): that lands in the staging directory.
        if self._ckpt_staging is not None:
            return self._ckpt_staging
        return super()._get_output_dir(trial)

    def _push_from_checkpoint(self, checkpoint_folder: str) -> None:
        if self._ckpt_staging is not None:  # push the published folder, after the rename
            self._ckpt_push_pending = True
            return
        super()._push_from_checkpoint(checkpoint_folder)

    def _staged_save(self, save, trial) -> None:
        """Write a checkpoint into ``<run_dir>/.tmp-checkpoint-N/checkpoint-N`` with `save()` (the full
        `_save_checkpoint` chain), then rename it to ``<run_dir>/checkpoint-N``, then rotate old checkpoints."""
        run_dir = self._get_output_dir(trial=trial)
        name = f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        root = ckpt.staging_root(run_dir, self.state.global_step)
        staged, final = os.path.join(root, name), os.path.join(run_dir, name)
        if self.args.should_save:
            ckpt.remove_stale_staging(run_dir)
        self.accelerator.wait_for_everyone()  # nobody writes into a staging directory being removed
        self._ckpt_staging, self._ckpt_push_pending = root, False
        try:
            save()
            self.accelerator.wait_for_everyone()  # every process has written its files (RNG states, shards)
        except BaseException as error:
            if self.args.should_save:
                shutil.rmtree(root, ignore_errors=True)
            if ckpt.is_disk_full(error, run_dir):
                raise OSError(errno.ENOSPC, f"No space left on the disk of {run_dir} while writing checkpoint {name} "
                              f"({type(error).__name__}: {error}). The partial checkpoint was removed; the earlier "
                              f"checkpoints are intact. Free space (or lower save_total_limit) and resume with "
                              f"resume_from_checkpoint=True.") from error
            raise
        finally:
            self._ckpt_staging = None
        best = self.state.best_model_checkpoint
        if best is not None and os.path.abspath(best).startswith(os.path.abspath(root) + os.sep):
            self.state.best_model_checkpoint = os.path.join(run_dir, os.path.relpath(best, root))
        if self.args.should_save:
            if os.path.isdir(staged):
                ckpt.fix_state_paths(staged, root, run_dir)
                ckpt.publish(staged, final, fsync=getattr(self.args, "checkpoint_fsync", True))
                logger.info("Checkpoint %s complete", final)
            else:
                shutil.rmtree(root, ignore_errors=True)
            # Trainer rotated inside the staging directory (a no-op there): rotate the real one, after the new
            # checkpoint is complete.
            if getattr(self, "run_id", None) is not None:  # only this run's checkpoints are ever deleted
                runs.rotate_own_checkpoints(run_dir, self.args.save_total_limit, self.run_id,
                                               self.state.best_model_checkpoint)
        self.accelerator.wait_for_everyone()  # the checkpoint is published before anyone goes on
        if self._ckpt_push_pending:
            self._ckpt_push_pending = False
            super()._push_from_checkpoint(final)
