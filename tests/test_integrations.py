"""The recipes of docs/integrations.md: HF Trainer, Lightning and accelerate with triton_adadelta.Adadelta.

Tiny models built from configs, synthetic data, no downloads. Each recipe trains a bf16 model (fp32
optimizer state, clipping inside the optimizer), checkpoints half way with the framework's own
mechanism, and resumes from that checkpoint in a fresh model and optimizer: the resumed run must end
bit-for-bit where the uninterrupted one did (parameters and optimizer state).
"""

from __future__ import annotations

import os
import sys

import pytest
import torch
from conftest import use_path

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _import_hub_kernels() -> None:
    """Import PyPI's ``kernels`` package (which transformers imports) ahead of the checkout's ``kernels/``
    folder: run from the repository root (``python -m pytest`` puts it first on sys.path), our device
    code's folder would shadow it. (An installed triton-adadelta has no top-level ``kernels``.)"""
    ours = os.path.join(_ROOT, "kernels")
    mod = sys.modules.get("kernels")
    if mod is not None and os.path.dirname(getattr(mod, "__file__", "") or "") == ours:
        del sys.modules["kernels"]
    saved = sys.path[:]
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.getcwd()) != _ROOT]
    try:
        import kernels  # noqa: F401
    finally:
        sys.path[:] = saved


_import_hub_kernels()

import lightning as L  # noqa: E402
from accelerate import Accelerator  # noqa: E402
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments  # noqa: E402

from triton_adadelta import Adadelta  # noqa: E402


@pytest.fixture(autouse=True)
def cpu_fused_path(monkeypatch):
    """The fused CPU path (conftest selects the Triton interpreter without a GPU: correct, but slow for
    these whole-framework runs; tests/test_keras3.py runs the kernel path once)."""
    use_path("cpu-fused", monkeypatch)


OPTIMIZER_KWARGS = dict(lr=1.0, rho=0.9, eps=1e-6, global_clipnorm=1.0)  # fp32 state: the default


def assert_same_training_state(model_a: torch.nn.Module, opt_a: Adadelta,
                               model_b: torch.nn.Module, opt_b: Adadelta) -> None:
    """Bit-for-bit: every parameter, and every tensor of the optimizer state (step counts included)."""
    params_a, params_b = dict(model_a.named_parameters()), dict(model_b.named_parameters())
    assert params_a.keys() == params_b.keys()
    for name, p in params_a.items():
        assert p.dtype == torch.bfloat16
        assert torch.equal(p, params_b[name]), name
    state_a, state_b = opt_a.state_dict()["state"], opt_b.state_dict()["state"]
    assert state_a.keys() == state_b.keys() and len(state_a) == len(params_a)
    for i, entry in state_a.items():
        assert entry["square_avg"].dtype == torch.float32  # bf16 parameters, fp32 state
        assert int(entry["step"]) > 0
        assert entry.keys() == state_b[i].keys()
        for name, value in entry.items():
            assert torch.equal(value, state_b[i][name]), (i, name)


# ----------------------------------------------------------------------------- HF Trainer
class TokenDataset(torch.utils.data.Dataset):
    """Random token sequences, the same for a given seed (a language-modelling batch: labels = inputs)."""

    def __init__(self, n: int = 24, length: int = 16, vocab: int = 64) -> None:
        self.ids = torch.randint(0, vocab, (n, length), generator=torch.Generator().manual_seed(0))

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def tiny_gpt2() -> GPT2LMHeadModel:
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=64, n_positions=16, n_embd=16, n_layer=1, n_head=2)
    return GPT2LMHeadModel(config).to(torch.bfloat16)


def hf_trainer(model, output_dir, how: str) -> Trainer:
    args = TrainingArguments(
        output_dir=str(output_dir), max_steps=6, per_device_train_batch_size=4, save_strategy="steps",
        save_steps=3, max_grad_norm=0.0,  # Trainer's clip_grad_norm_ off: the optimizer clips (global_clipnorm)
        use_cpu=True, report_to=[], logging_strategy="no", disable_tqdm=True, seed=0,
        dataloader_num_workers=0)
    if how == "instance":
        return Trainer(model=model, args=args, train_dataset=TokenDataset(),
                       optimizers=(Adadelta(model.parameters(), **OPTIMIZER_KWARGS), None))
    return Trainer(model=model, args=args, train_dataset=TokenDataset(),
                   optimizer_cls_and_kwargs=(Adadelta, OPTIMIZER_KWARGS))


@pytest.mark.parametrize("how", ["instance", "cls_and_kwargs"])
def test_hf_trainer_resume_equals_uninterrupted(tmp_path, how):
    straight = hf_trainer(tiny_gpt2(), tmp_path, how)
    straight.train()  # 6 steps, checkpoints at 3 and 6
    assert isinstance(straight.optimizer.optimizer if hasattr(straight.optimizer, "optimizer")
                      else straight.optimizer, Adadelta)
    resumed = hf_trainer(tiny_gpt2(), tmp_path / "resumed", how)
    resumed.train(resume_from_checkpoint=str(tmp_path / "checkpoint-3"))
    assert resumed.state.global_step == straight.state.global_step == 6
    assert_same_training_state(straight.model, straight.optimizer, resumed.model, resumed.optimizer)


# ----------------------------------------------------------------------------- Lightning
class LitRegression(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return torch.nn.functional.mse_loss(self.net(x), y)

    def configure_optimizers(self):
        return Adadelta(self.parameters(), **OPTIMIZER_KWARGS)


def regression_loader(dtype=torch.float32) -> torch.utils.data.DataLoader:
    gen = torch.Generator().manual_seed(1)
    x, y = torch.randn(24, 8, generator=gen), torch.randn(24, 1, generator=gen)
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x.to(dtype), y.to(dtype)), batch_size=8)


def lightning_trainer(max_epochs: int, checkpoint_dir=None) -> L.Trainer:
    callbacks = []
    if checkpoint_dir is not None:
        callbacks.append(L.pytorch.callbacks.ModelCheckpoint(dirpath=str(checkpoint_dir), save_top_k=-1,
                                                             every_n_epochs=1))
    return L.Trainer(max_epochs=max_epochs, accelerator="cpu", devices=1, precision="bf16-true", logger=False,
                     enable_progress_bar=False, enable_model_summary=False, callbacks=callbacks,
                     enable_checkpointing=checkpoint_dir is not None)


def test_lightning_resume_equals_uninterrupted(tmp_path):
    straight = LitRegression()
    trainer = lightning_trainer(2, tmp_path)
    trainer.fit(straight, regression_loader())  # 2 epochs of 3 steps, a checkpoint after each
    resumed = LitRegression()
    again = lightning_trainer(2)
    again.fit(resumed, regression_loader(), ckpt_path=str(tmp_path / "epoch=0-step=3.ckpt"))
    assert trainer.global_step == again.global_step == 6
    assert_same_training_state(straight, trainer.optimizers[0], resumed, again.optimizers[0])


# ----------------------------------------------------------------------------- accelerate
def accelerate_run(checkpoint_dir, save_at=None, resume=False):
    """6 steps (or the rest of them after loading ``checkpoint_dir``) of a bf16 model with accelerate."""
    accelerator = Accelerator(cpu=True)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1)).to(torch.bfloat16)
    opt = Adadelta(model.parameters(), **OPTIMIZER_KWARGS)
    loader = regression_loader(torch.bfloat16)
    model, opt, loader = accelerator.prepare(model, opt, loader)
    batches, done = [loader, loader], 0
    if resume:
        accelerator.load_state(str(checkpoint_dir))
        done = save_at
        batches = [accelerator.skip_first_batches(loader, save_at % len(loader)), loader]
    for epoch_batches in batches:
        for x, y in epoch_batches:
            loss = torch.nn.functional.mse_loss(model(x), y)
            accelerator.backward(loss)
            opt.step()
            opt.zero_grad()
            done += 1
            if done == save_at and not resume:
                accelerator.save_state(str(checkpoint_dir))
        if resume and done >= 6:
            break
    assert done == 6
    return accelerator.unwrap_model(model), opt.optimizer


def test_accelerate_resume_equals_uninterrupted(tmp_path):
    straight_model, straight_opt = accelerate_run(tmp_path / "ckpt", save_at=2)
    resumed_model, resumed_opt = accelerate_run(tmp_path / "ckpt", save_at=2, resume=True)
    assert_same_training_state(straight_model, straight_opt, resumed_model, resumed_opt)
