"""The LightningModule: objective, logging, optimizer groups. Schedules live in callbacks."""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from jsonargparse.typing import NonNegativeFloat, NonNegativeInt, PositiveFloat, PositiveInt
from torch import Tensor

from dti_sprites.metrics import (
    ARI,
    ClusteringAccuracy,
    ForegroundIoU,
    SemanticScores,
    ari_per_image,
)
from dti_sprites.model import Decomposition, DTISprites
from dti_sprites.optim import Adam


class DTISpritesModule(L.LightningModule):
    """Trains a :class:`DTISprites` model.

    The objective is the paper's: reconstruction MSE of the selected composition plus
    λ × the mean number of non-empty sprites per image. Given the selection the penalty is a
    constant, so only the MSE carries gradients; both terms are logged where λ can change a
    choice (see :meth:`objective`).

    Args:
        model: the layered sprite model.
        lr: Adam learning rate of both parameter groups.
        weight_decay: weight decay of the network group (the prototype group has none).
        encoder_lr_multiplier: scales the encoder's learning rate (1 = the paper's setting).
        encoder_updates_per_step: Adam updates of the shared encoder per training step, all from
            the same gradient. The authors' code updates it once per module that holds it, and
            the paper's numbers come from that: 1 for Tetrominoes, 7 for Multi-dSprites (5 layers'
            sprite transformations, the layer and the background transformation), 8 for CLEVR6
            (6 layers' + 2). See :class:`dti_sprites.optim.Adam`.
        prototype_lr_multiplier: scales the learning rate of the prototypes (sprites, masks,
            backgrounds; 1 = the paper's setting). Adam moves a parameter by about lr per step,
            so in a short run the masks hardly leave their initial Gaussian without a larger one
            (the demo uses 10).
        init_images: training images averaged for a ``mean`` background init.
    """

    def __init__(
        self,
        model: DTISprites,
        lr: PositiveFloat = 1e-4,
        weight_decay: NonNegativeFloat = 1e-6,
        encoder_lr_multiplier: PositiveFloat = 1.0,
        encoder_updates_per_step: PositiveInt = 1,
        prototype_lr_multiplier: PositiveFloat = 1.0,
        init_images: NonNegativeInt = 100,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(
            {"lr": float(lr), "weight_decay": float(weight_decay),
             "encoder_lr_multiplier": float(encoder_lr_multiplier),
             "encoder_updates_per_step": int(encoder_updates_per_step),
             "prototype_lr_multiplier": float(prototype_lr_multiplier),
             "init_images": int(init_images)}
        )  # fmt: skip
        self.model = model
        k0 = model.sprites.n_sprites
        self.register_buffer("usage", torch.zeros(k0, dtype=torch.long), persistent=False)
        self.metrics = torch.nn.ModuleDict()  # built per evaluation protocol in setup()

    # ------------------------------------------------------------------------------- setup
    def setup(self, stage: str) -> None:
        datamodule = getattr(self.trainer, "datamodule", None)
        if datamodule is None:
            return
        data_size = tuple(getattr(datamodule, "image_size", ()))
        model_size = (self.model.image_size, self.model.image_size)
        if data_size and data_size != model_size:
            raise ValueError(
                f"model.init_args.model.init_args.image_size is {self.model.image_size} but the "
                f"data ({type(datamodule).__name__}) has images of size {data_size}"
            )
        self._make_metrics()
        backgrounds = self.model.backgrounds
        if stage == "fit" and not bool(backgrounds.initialised) and self.hparams.init_images:
            backgrounds.init_from_images(datamodule.init_images(self.hparams.init_images))

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["dti_sprites_model"] = self.model.config  # see DTISprites.from_checkpoint
        # Random state (mask noise, shuffling), so that a resumed run continues exactly.
        checkpoint["rng_state"] = {"torch": torch.get_rng_state()}
        if torch.cuda.is_available():
            checkpoint["rng_state"]["cuda"] = torch.cuda.get_rng_state_all()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state = checkpoint.get("rng_state")
        if state is None:
            return
        torch.set_rng_state(state["torch"])
        if "cuda" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda"])

    # ---------------------------------------------------------------------------- training
    def forward(self, image: Tensor) -> Decomposition:
        return self.model(image)

    def objective(self, out: Decomposition) -> dict[str, Tensor]:
        """Loss terms of a batch: ``mse`` (the loss) and, where λ can change a choice (an empty
        sprite to choose, sprites not frozen), ``penalty`` and the sum ``objective``.

        Without an empty sprite every candidate pays λ alike, so the penalty is no term of the
        objective and is not logged; while sprites are frozen it is off (logged as 0).
        """
        mse = out.mse.mean()
        if not self.model.sprites.empty_sprite:
            return {"mse": mse}
        penalty = self.model.active_penalty * out.n_nonempty.to(mse.dtype).mean()
        return {"mse": mse, "penalty": penalty, "objective": mse + penalty.detach()}

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> dict[str, Tensor]:
        out = self.model(batch["image"])
        terms = self.objective(out)
        self._stop_on_nonfinite(terms["mse"])
        self.log_dict({f"train/{k}": v for k, v in terms.items()}, prog_bar=True, sync_dist=True)
        choice = out.sprite_choice
        self.usage += torch.bincount(choice[choice >= 0], minlength=len(self.usage))
        loss = terms["mse"]
        idle = self.model.idle_parameters()
        if idle:
            # Keep every parameter in the graph so that plain DDP (no unused-parameter search)
            # works; their zero gradients are dropped in on_before_optimizer_step.
            loss = loss + 0.0 * sum(p.sum() for p in idle)
        return {"loss": loss, "sprite_choice": choice.detach()}

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        # Frozen sprites and inactive heads get no update at all (no momentum, no decay).
        for p in self.model.idle_parameters():
            p.grad = None

    def _stop_on_nonfinite(self, loss: Tensor) -> None:
        """Stop before the optimizer step when the loss is NaN or Inf on any rank."""
        bad = not bool(torch.isfinite(loss))
        if not self.trainer.strategy.reduce_boolean_decision(bad, all=False):
            return
        callback = self.trainer.checkpoint_callback
        last = callback and (callback.last_model_path or callback.best_model_path)
        raise FloatingPointError(
            f"non-finite training loss ({loss.item()}) at global step {self.global_step} "
            f"(epoch {self.current_epoch}); training stopped before this step's update. "
            f"Last good checkpoint: {last or 'none saved yet'}"
        )

    def on_train_epoch_end(self) -> None:
        usage = self.trainer.strategy.reduce(self.usage.float(), reduce_op="sum")
        share = usage / usage.sum().clamp(min=1)
        self.log_dict({f"usage/sprite_{k}": v for k, v in enumerate(share)}, sync_dist=False)
        self.usage.zero_()

    # -------------------------------------------------------------------------- evaluation
    def _protocols(self) -> tuple[str, ...]:
        datamodule = getattr(self.trainer, "datamodule", None)
        return tuple(getattr(datamodule, "eval_protocols", None) or ("val",))

    def _make_metrics(self) -> None:
        """One set of metrics per evaluation protocol (dataloader), by the data's ground truth.

        Multi-object data: ARI, ARI-FG and semantic scores (classes from the DataModule's
        ``num_semantic_classes``); single-object data: clustering accuracy when labelled,
        foreground IoU on masks. Which are updated depends on the keys of each batch.
        """
        datamodule = getattr(self.trainer, "datamodule", None)
        n_semantic = getattr(datamodule, "num_semantic_classes", 0)
        n_classes = getattr(datamodule, "num_classes", 0)
        k0 = self.model.sprites.n_sprites
        metrics = {}
        for protocol in self._protocols():
            group: dict[str, torch.nn.Module] = {}
            if self.model.n_layers > 1:
                group["ari"] = ARI(foreground_only=False)
                group["ari_fg"] = ARI(foreground_only=True)
                if n_semantic:
                    group["semantic"] = SemanticScores(n_semantic, num_clusters=k0 + 1)
            else:
                group["fg_iou"] = ForegroundIoU()
                if n_classes:
                    group["clustering"] = ClusteringAccuracy(n_classes, num_clusters=k0)
            metrics[self._metric_key(protocol)] = torch.nn.ModuleDict(group)
        self.metrics = torch.nn.ModuleDict(metrics)

    @staticmethod
    def _metric_key(protocol: str) -> str:
        """ModuleDict key of a protocol (a bare ``train`` would clash with ``Module.train``)."""
        return f"protocol_{protocol}"

    def _eval_step(
        self, stage: str, batch: dict[str, Tensor], dataloader_idx: int
    ) -> dict[str, Tensor]:
        """Loss terms and metric updates; returns per-image ``ari_fg`` (B,) and ``index``."""
        image = batch["image"]
        out = self.model(image)
        terms = self.objective(out)
        protocol = self._protocols()[dataloader_idx]
        self.log_dict(
            {f"{stage}/{protocol}/{k}": v for k, v in terms.items()},
            sync_dist=True,
            add_dataloader_idx=False,
        )
        key = self._metric_key(protocol)
        metrics = self.metrics[key] if key in self.metrics else {}
        result: dict[str, Tensor] = {}
        if "ari" in metrics and "mask" in batch:
            instance_fg = out.instance_fg(image)
            metrics["ari"].update(out.instance(), batch["mask"])
            metrics["ari_fg"].update(instance_fg, batch["mask"])
            result["ari_fg"] = ari_per_image(instance_fg, batch["mask"], foreground_only=True)
        if "semantic" in metrics and "semantic" in batch:
            metrics["semantic"].update(out.semantic(), batch["semantic"])
        if "fg_iou" in metrics and "mask" in batch:
            metrics["fg_iou"].update(out.instance() > 0, batch["mask"] > 0)
        if "clustering" in metrics and "label" in batch:
            metrics["clustering"].update(out.sprite_choice[:, 0].clamp(min=0), batch["label"])
        if "index" in batch:
            result["index"] = batch["index"]
        return result

    def _log_metrics(self, stage: str) -> dict[str, float]:
        """Compute (synced across ranks), log and reset every metric that saw data."""
        values: dict[str, float] = {}
        for key, group in self.metrics.items():
            protocol = key.removeprefix("protocol_")
            for name, metric in group.items():
                if not metric.update_called:
                    continue
                result = metric.compute()
                result = result if isinstance(result, dict) else {name: result}
                for key, value in result.items():
                    values[f"{stage}/{protocol}/{key}"] = float(value)
                metric.reset()
        if values:
            self.log_dict(values, sync_dist=False, add_dataloader_idx=False)
        return values

    def on_validation_epoch_start(self) -> None:
        if {self._metric_key(p) for p in self._protocols()} != set(self.metrics.keys()):
            self._make_metrics()

    on_test_epoch_start = on_validation_epoch_start

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int, dataloader_idx: int = 0):
        return self._eval_step("val", batch, dataloader_idx)

    def on_validation_epoch_end(self) -> None:
        values = self._log_metrics("val")
        if not self.trainer.sanity_checking:
            self._print_table(f"Validation at step {self.global_step} (%)", values)

    def test_step(self, batch: dict[str, Tensor], batch_idx: int, dataloader_idx: int = 0):
        return self._eval_step("test", batch, dataloader_idx)

    def on_test_epoch_end(self) -> None:
        self._print_table("Test results (%)", self._log_metrics("test"))

    def _print_table(self, title: str, values: dict[str, float]) -> None:
        """A (metric, value, protocol) table of ``stage/protocol/metric`` values, on rank 0."""
        if not self.trainer.is_global_zero or not values:
            return
        rows = [[*key.split("/", 2)[1:], value] for key, value in values.items()]
        width = max(len(metric) for _, metric, _ in rows)
        lines = [f"{'metric':<{width}}  {'value':>8}  protocol"]
        for protocol, metric, value in sorted(rows, key=lambda r: (r[0], r[1])):
            lines.append(f"{metric:<{width}}  {100 * value:8.2f}  {protocol}")
        print("\n".join(["", title, *lines]), flush=True)

    def predict_step(self, batch: dict[str, Tensor], batch_idx: int, dataloader_idx: int = 0):
        """The arrays of predictions.h5 for this batch (see ``Decomposition.to_arrays``)."""
        arrays = self.model(batch["image"]).to_arrays(batch["image"])
        if "index" in batch:
            arrays["index"] = batch["index"].cpu().numpy().astype("int64")
        return arrays

    # ---------------------------------------------------------------------------- optimizer
    def parameter_groups(self) -> list[dict[str, Any]]:
        """Prototypes (sprites, masks, backgrounds; no weight decay) and networks.

        The encoder has a group of its own (``encoder``, a part of the networks) when its lr or
        its number of updates per step differs from the other networks'.
        """
        model = self.model
        prototypes = [model.sprites.appearance, model.sprites.mask]
        if model.backgrounds.image is not None:
            prototypes.append(model.backgrounds.image)
        encoder = list(model.encoder.parameters())
        taken = {id(p) for p in prototypes + encoder}
        heads = [p for p in model.parameters() if id(p) not in taken]
        lr, wd = self.hparams.lr, self.hparams.weight_decay
        lr_prototypes = lr * self.hparams.prototype_lr_multiplier
        groups = [
            {"name": "prototypes", "params": prototypes, "lr": lr_prototypes, "weight_decay": 0.0},
            {"name": "networks", "params": heads, "lr": lr, "weight_decay": wd},
        ]
        multiplier = self.hparams.encoder_lr_multiplier
        updates = self.hparams.get("encoder_updates_per_step", 1)
        if multiplier == 1.0 and updates == 1:
            groups[1]["params"] = encoder + heads
        else:
            groups.append(
                {"name": "encoder", "params": encoder, "lr": lr * multiplier,
                 "weight_decay": wd, "updates": updates}
            )  # fmt: skip
        return groups

    def configure_optimizers(self) -> torch.optim.Optimizer:
        groups = self.parameter_groups()
        for group in groups:
            group["initial_lr"] = group["lr"]  # base of the LR drops (kept in checkpoints)
        return Adam(groups)
