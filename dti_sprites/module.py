"""The LightningModule: objective, logging, optimizer groups and their LR drops (a Lightning LR
scheduler). The other schedules live in callbacks."""

from __future__ import annotations

from typing import Any, get_args

import lightning as L
import torch
from jsonargparse.typing import NonNegativeFloat, NonNegativeInt, PositiveFloat, PositiveInt
from torch import Tensor
from torchmetrics import Metric, MetricCollection

from dti_sprites.allocator import keep_freed_memory
from dti_sprites.metrics import (
    ARI,
    ClusteringScore,
    ForegroundIoU,
    SemanticScore,
    SemanticScoreName,
    ari_per_image,
)
from dti_sprites.model import Decomposition, DTISprites
from dti_sprites.optim import Adam, LRDrops, MilestoneDrops
from dti_sprites.ranks import gather_ranks, pick_rank, rng_state, set_rng_state


def usage_counts(sprite_choice: Tensor, n_sprites: int) -> Tensor:
    """Choices per layer and sprite. sprite_choice (B, L), −1 = empty → (L, K0 + 1) int64,
    column K0 counting the empty sprite."""
    choice = sprite_choice.detach().long()
    choice = torch.where(choice < 0, n_sprites, choice)  # (B, L)
    index = choice.T  # (L, B)
    counts = torch.zeros(choice.shape[1], n_sprites + 1, dtype=torch.long, device=choice.device)
    return counts.scatter_add_(1, index, torch.ones_like(index))  # (L, K0 + 1)


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
            (every shipped config keeps 1: the fast recipes seed the masks instead).
        init_images: training images averaged for a ``mean`` background init.
        lr_drops: learning-rate drops (:class:`~dti_sprites.optim.LRDrops`: milestones in
            epochs or steps, one gamma per group: prototypes, networks, and the encoder when it
            has a group of its own, which takes the networks' gamma unless a third is given; a
            single gamma for all). ``configure_optimizers`` returns them as Lightning's LR
            scheduler (:class:`~dti_sprites.optim.MilestoneDrops`, stepped every step or every
            epoch), so they are in checkpoints and a resumed run continues exactly. None or no
            milestone: no drop.
        keep_freed_memory: at setup, keep freed memory in the process for reuse (glibc's
            ``mmap`` and trim thresholds raised, :mod:`dti_sprites.allocator`): the same
            arithmetic, 1.1–1.8× faster on the CPU (2026-12-06), and the process holds its
            peak memory. Process-wide; False leaves the C library's defaults.
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
        lr_drops: LRDrops | None = None,
        keep_freed_memory: bool = True,
    ) -> None:
        super().__init__()
        if isinstance(lr_drops, dict):  # e.g. the hyper-parameters of a checkpoint
            lr_drops = LRDrops(**lr_drops)
        lr_drops = lr_drops or LRDrops()
        self.lr_drops = lr_drops
        self._lr_drops_from_trainer = False  # see on_load_checkpoint
        self.save_hyperparameters(
            {
                "lr": float(lr),
                "weight_decay": float(weight_decay),
                "encoder_lr_multiplier": float(encoder_lr_multiplier),
                "encoder_updates_per_step": int(encoder_updates_per_step),
                "prototype_lr_multiplier": float(prototype_lr_multiplier),
                "init_images": int(init_images),
                "lr_drops": lr_drops.to_dict(),
                "keep_freed_memory": bool(keep_freed_memory),
            }
        )
        self.model = model
        # Sprite usage: choices per (layer, sprite) since the start, the empty sprite last. One
        # counter for every reader (epoch logging, reassignment, dashboard); each keeps its own
        # baseline and reads the difference (see usage_since).
        usage = torch.zeros(model.n_layers, model.sprites.n_sprites + 1, dtype=torch.long)
        self.register_buffer("usage", usage)  # (L, K0 + 1), in checkpoints
        self._epoch_usage = usage.clone()  # usage at the start of the epoch, this process
        self.metrics = torch.nn.ModuleDict()  # MetricCollections, built in setup()

    # ------------------------------------------------------------------------------- setup
    def setup(self, stage: str) -> None:
        if self.hparams.get("keep_freed_memory", True):
            keep_freed_memory()
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
        # Each process's random state (mask noise) and epoch baseline of the usage counter, so
        # that a resumed run continues exactly (dti_sprites.ranks: gathered from every process).
        checkpoint["rng_state"] = gather_ranks(rng_state())
        checkpoint["epoch_usage"] = gather_ranks(self._epoch_usage.cpu())

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # Set at once: the training loaders draw nothing from the global random state, the
        # sanity check runs isolated from it, and a plain DataLoader's draws at the next epoch
        # start then come from the restored state, as in the interrupted run.
        state = checkpoint.get("rng_state")
        if state is not None:
            set_rng_state(pick_rank(state, "rng_state"))
        if "epoch_usage" in checkpoint:
            self._epoch_usage = pick_rank(checkpoint["epoch_usage"], "epoch_usage").clone()
        # A checkpoint without the LR drops' scheduler state (written before issue 21, when an
        # LRDrops callback set the lrs, or by a run without drops): the scheduler takes its time
        # from the trainer at the first training step (see on_train_batch_start).
        self._lr_drops_from_trainer = bool(self.lr_drops.milestones) and not checkpoint.get(
            "lr_schedulers"
        )
        checkpoint.get("callbacks", {}).pop("LRDrops", None)  # that callback's state: superseded

    # ---------------------------------------------------------------------------- training
    def forward(self, image: Tensor) -> Decomposition:
        return self.model(image)

    def objective(self, out: Decomposition) -> dict[str, Tensor]:
        """Loss terms of a batch: ``mse`` (the loss), ``placement`` when the placement search
        ran (added to the loss), and, where λ can change a choice (an empty sprite to choose,
        sprites not frozen), ``penalty`` and the sum ``objective``.

        Without an empty sprite every candidate pays λ alike, so the penalty is no term of the
        objective and is not logged; while sprites are frozen it is off (logged as 0).
        """
        mse = out.mse.mean()
        terms = {"mse": mse}
        if out.placement is not None:
            terms["placement"] = out.placement
        if not self.model.sprites.empty_sprite:
            return terms
        penalty = self.model.active_penalty * out.n_nonempty.to(mse.dtype).mean()
        return {**terms, "penalty": penalty, "objective": mse + penalty.detach()}

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> dict[str, Tensor]:
        out = self.model(batch["image"])
        terms = self.objective(out)
        self._stop_on_nonfinite(terms["mse"])
        self.log_dict({f"train/{k}": v for k, v in terms.items()}, prog_bar=True, sync_dist=True)
        choice = out.sprite_choice
        self.count_usage(choice)
        loss = terms["mse"] + terms.get("placement", 0.0)
        idle = self.model.idle_parameters()
        if idle:
            # Keep every parameter in the graph so that plain DDP (no unused-parameter search)
            # works; their zero gradients are dropped in on_before_optimizer_step.
            loss = loss + 0.0 * sum(p.sum() for p in idle)
        layer_mass = out.layers[:, :, -1].detach().sum((2, 3))  # (B, L) alpha, as placed
        return {"loss": loss, "sprite_choice": choice.detach(), "layer_mass": layer_mass}

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

    @torch.no_grad()
    def count_usage(self, choice: Tensor) -> None:
        """Add a batch's choices (B, L) (−1 = empty) to ``usage``."""
        self.usage += usage_counts(choice, self.model.sprites.n_sprites).to(self.usage)

    def usage_since(self, baseline: Tensor | None) -> Tensor:
        """Choices per (layer, sprite) since ``baseline`` (a clone of ``usage``), this rank."""
        usage = self.usage.detach()
        return usage.clone() if baseline is None else usage - baseline.to(usage)

    def on_train_epoch_end(self) -> None:
        counts = self.usage_since(self._epoch_usage)[:, :-1].sum(0)  # (K0,)
        self._epoch_usage = self.usage.detach().clone()
        usage = self.trainer.strategy.reduce(counts.float(), reduce_op="sum")
        share = usage / usage.sum().clamp(min=1)
        self.log_dict({f"usage/sprite_{k}": v for k, v in enumerate(share)}, sync_dist=False)

    # -------------------------------------------------------------------------- evaluation
    def eval_protocols(self) -> tuple[str, ...]:
        """Names of the evaluation dataloaders, in order: the DataModule's ``eval_protocols``
        (e.g. ``paper320``, ``heldout``), or ``val`` for a single unnamed one."""
        datamodule = getattr(self.trainer, "datamodule", None)
        return tuple(getattr(datamodule, "eval_protocols", None) or ("val",))

    def protocol(self, dataloader_idx: int = 0) -> str:
        """Name of evaluation dataloader ``dataloader_idx``."""
        return self.eval_protocols()[dataloader_idx]

    def _metric_groups(self) -> dict[str, dict[str, Metric]]:
        """The metrics of one protocol, by the labels they are updated with.

        Multi-object data: ARI on ``instance``, ARI-FG on ``instance_fg``, the semantic scores
        on ``semantic`` (when the DataModule has ``num_semantic_classes``); single-object data:
        foreground IoU on masks and clustering accuracy / NMI on labels (``num_classes``).
        Which are updated depends on the keys of each batch.
        """
        datamodule = getattr(self.trainer, "datamodule", None)
        n_semantic = getattr(datamodule, "num_semantic_classes", 0)
        n_classes = getattr(datamodule, "num_classes", 0)
        k0 = self.model.sprites.n_sprites
        if self.model.n_layers > 1:
            groups: dict[str, dict[str, Metric]] = {
                "instance": {"ari": ARI(foreground_only=False)},
                "instance_fg": {"ari_fg": ARI(foreground_only=True)},
            }
            if n_semantic:
                groups["semantic"] = {
                    name: SemanticScore(n_semantic, k0 + 1, name)
                    for name in get_args(SemanticScoreName)
                }
            return groups
        groups = {"foreground": {"fg_iou": ForegroundIoU()}}
        if n_classes:
            groups["label"] = {
                name: ClusteringScore(n_classes, k0, name) for name in ("acc", "nmi")
            }
        return groups

    def _make_metrics(self) -> None:
        """One ``MetricCollection`` per stage, protocol and label source, prefixed
        ``<stage>/<protocol>/``; Lightning computes, syncs and resets what is logged."""
        metrics = {}
        for stage in ("val", "test"):
            for protocol in self.eval_protocols():
                for source, group in self._metric_groups().items():
                    metrics[f"{stage}__{protocol}__{source}"] = MetricCollection(
                        group, prefix=f"{stage}/{protocol}/"
                    )
        self.metrics = torch.nn.ModuleDict(metrics).to(self.device)

    def _eval_step(
        self, stage: str, batch: dict[str, Tensor], dataloader_idx: int
    ) -> dict[str, Tensor]:
        """Loss terms and metric updates; returns per-image ``ari_fg`` (B,) and ``index``."""
        image = batch["image"]
        out = self.model(image)
        protocol = self.protocol(dataloader_idx)
        terms = self.objective(out)
        self.log_dict(
            {f"{stage}/{protocol}/{k}": v for k, v in terms.items()},
            sync_dist=True,
            add_dataloader_idx=False,
        )
        result: dict[str, Tensor] = {}
        inputs: dict[str, tuple[Tensor, Tensor]] = {}
        if "mask" in batch and self.model.n_layers > 1:
            instance_fg = out.instance_fg(image)
            inputs["instance"] = (out.instance(), batch["mask"])
            inputs["instance_fg"] = (instance_fg, batch["mask"])
            result["ari_fg"] = ari_per_image(instance_fg, batch["mask"], foreground_only=True)
        elif "mask" in batch:  # single-object data: the sprite's mask against the object's
            inputs["foreground"] = (out.instance() > 0, batch["mask"] > 0)
        if "semantic" in batch:
            inputs["semantic"] = (out.semantic(), batch["semantic"])
        if "label" in batch:
            inputs["label"] = (out.sprite_choice[:, 0].clamp(min=0), batch["label"])
        for source, (pred, target) in inputs.items():
            key = f"{stage}__{protocol}__{source}"
            if key in self.metrics:
                self.metrics[key].update(pred, target)
                self.log_dict(self.metrics[key], add_dataloader_idx=False)
        if "index" in batch:
            result["index"] = batch["index"]
        return result

    def on_validation_epoch_start(self) -> None:
        expected = {key.split("__")[1] for key in self.metrics.keys()}
        if expected != set(self.eval_protocols()):
            self._make_metrics()

    on_test_epoch_start = on_validation_epoch_start

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int, dataloader_idx: int = 0):
        return self._eval_step("val", batch, dataloader_idx)

    def test_step(self, batch: dict[str, Tensor], batch_idx: int, dataloader_idx: int = 0):
        return self._eval_step("test", batch, dataloader_idx)

    def on_validation_end(self) -> None:
        if not self.trainer.sanity_checking:
            self._print_table(f"Validation at step {self.global_step} (%)", "val")

    def on_test_end(self) -> None:
        self._print_table("Test results (%)", "test")

    def metric_values(self, stage: str) -> dict[str, float]:
        """``<stage>/<protocol>/<metric>`` values of the last evaluation (as logged)."""
        names = {
            name
            for key, collection in self.metrics.items()
            if key.startswith(f"{stage}__")
            for name in collection.keys(keep_base=False)
        }
        metrics = self.trainer.callback_metrics
        return {name: float(metrics[name]) for name in names if name in metrics}

    def _print_table(self, title: str, stage: str) -> None:
        """A (metric, value, protocol) table of the stage's metric values, on rank 0."""
        values = self.metric_values(stage)
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
                {
                    "name": "encoder",
                    "params": encoder,
                    "lr": lr * multiplier,
                    "weight_decay": wd,
                    "updates": updates,
                }
            )
        return groups

    def lr_gammas(self, groups: list[dict[str, Any]]) -> list[float]:
        """The LR drops' gamma of each parameter group (see ``lr_drops``)."""
        gammas = list(self.lr_drops.gammas)
        names = [g.get("name") for g in groups]
        if len(gammas) == 1:
            gammas *= len(groups)
        if len(gammas) == 2 and names == ["prototypes", "networks", "encoder"]:
            gammas.append(gammas[1])  # the encoder is a network
        if len(gammas) != len(groups):
            raise ValueError(
                f"LRDrops.gammas has {len(self.lr_drops.gammas)} values for {len(groups)} "
                f"optimizer groups ({names})"
            )
        return gammas

    def make_optimizer(self) -> Adam:
        """Adam over :meth:`parameter_groups`, without the LR drops' scheduler: the optimizer
        of :meth:`configure_optimizers`, for a loop that runs no trainer (the benchmarks)."""
        return Adam(self.parameter_groups())

    def configure_optimizers(self) -> torch.optim.Optimizer | dict[str, Any]:
        """Adam over :meth:`parameter_groups`; with LR drops, also their scheduler, which
        Lightning steps after every optimizer step or at every epoch's end (``interval``)."""
        optimizer = self.make_optimizer()
        if not self.lr_drops.milestones:
            return optimizer
        scheduler = MilestoneDrops(
            optimizer, self.lr_drops.milestones, self.lr_gammas(optimizer.param_groups)
        )
        return {
            "optimizer": optimizer,
            "lr_scheduler": {
                "scheduler": scheduler,
                "interval": self.lr_drops.interval,
                "frequency": 1,
                "name": "lr_drops",
            },
        }

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        if self._lr_drops_from_trainer:
            self._lr_drops_from_trainer = False
            self.sync_lr_drops()

    def sync_lr_drops(self) -> None:
        """Put the LR drops' scheduler at the trainer's step (or epoch) and set the lrs it
        gives: what a checkpoint without the scheduler's state needs (an LRDrops callback used
        to recompute the lrs from the step or epoch in this way)."""
        for config in self.trainer.lr_scheduler_configs:
            scheduler = config.scheduler
            if not isinstance(scheduler, MilestoneDrops):
                continue
            groups = scheduler.optimizer.param_groups
            scheduler.base_lrs = [
                g.get("initial_lr", base)
                for g, base in zip(groups, scheduler.base_lrs, strict=True)
            ]
            epoch = config.interval == "epoch"
            scheduler.last_epoch = self.trainer.current_epoch if epoch else self.trainer.global_step
            for group, lr in zip(groups, scheduler.get_lr(), strict=True):
                group["lr"] = lr
            scheduler._last_lr = [g["lr"] for g in groups]
