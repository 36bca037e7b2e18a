"""utils.py and checkpoints.py: fit and its loops, the optimizer, schedule and weight average, the model
checks before training, the range test, the device; checkpoints and weights."""

import itertools
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from learner_models import LinearNet
from torch import nn

import report
import train as train_py
import utils
from checkpoints import load_weights, read_checkpoint
from config import CheckpointError, ConfigError, NonFiniteLossError, TrainConfig, build_model, make_config
from conftest import CPU, SMALL, same_weights, train, without_timings
from data import TensorLoader, make_loaders
from model import Net, NetCompact
from static_step import StaticStep
from utils import average_of, evaluate, fit, make_optimizer, prepare_model, train_epoch


def test_test_loss_is_the_mean_over_all_images_not_over_batches(mnist):
    torch.manual_seed(0)
    model = NetCompact().eval()
    images, labels = mnist["test"][0][:100], mnist["test"][1][:100]
    # Batches of 32 leave a last batch of 4: a mean of batch means would weigh it 8 times too much.
    result = evaluate(model, TensorLoader(images, labels, 32, CPU, train=False))
    log_probs = model((images.unsqueeze(1).float() / 255 - 0.1307) / 0.3081)
    by_hand = sum(-log_probs[i, labels[i]].item() for i in range(100)) / 100
    assert result["loss"] == pytest.approx(by_hand, rel=1e-5)
    assert result["acc"] == (log_probs.argmax(1) == labels).sum().item()
    assert torch.equal(result["predictions"], log_probs.argmax(1))
    mean_of_batch_means = sum(F.nll_loss(log_probs[i:i + 32], labels[i:i + 32]).item()
                              for i in range(0, 100, 32)) / 4
    assert result["loss"] != pytest.approx(mean_of_batch_means, rel=1e-5)  # the same tolerance as above


def test_same_seed_gives_identical_weights_and_history_other_seed_does_not():
    first, first_history = train(seed=5)
    second, second_history = train(seed=5)
    other, _ = train(seed=6)
    assert same_weights(first, second) and not same_weights(first, other)
    assert without_timings(first_history) == without_timings(second_history)


def test_fit_learns_and_reports_each_epoch():
    # What it prints (the recipe line, "epoch 1/3") is checked through the command line in test_cli.py.
    _, history = train(epochs=3, train_limit=3000, rotate=10.0)
    assert len(history) == 3 and history[-1]["test_acc"] > 80
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    assert history[0]["lr"] < history[1]["lr"]  # one-cycle: the rate rises from a low start
    for row in history:
        assert row["test_acc"] * 5 == pytest.approx(round(row["test_acc"] * 5))  # a count out of 500


@pytest.mark.slow
def test_full_training_reaches_the_accuracy_target(tmp_path):
    """The README's headline run: the defaults (Net, 20 epochs, seed 0) on the real data, final epoch."""
    metrics = train_py.train_once({"seed": 0}, out=tmp_path, progress=False)
    assert len(metrics["epochs"]) == 20 and metrics["epochs"][-1]["test_acc"] >= 99.4, metrics["epochs"][-1]


@pytest.mark.parametrize("ema", [0.0, 0.5])
def test_clean_bn_re_estimates_batchnorm_statistics_on_the_unaugmented_images(mnist, ema):
    clean = (mnist["train"][0][:1000].unsqueeze(1).float() / 255 - 0.1307) / 0.3081
    means = {}
    for clean_bn in (False, True):
        model, history = train(epochs=1, ema=ema, clean_bn=clean_bn, rotate=10.0, shift=2.0, scale=0.1)
        assert ("test_acc_before_clean_bn" in history[-1]) == clean_bn
        with torch.no_grad():
            first_conv = model.features[0](clean)
        means[clean_bn] = (model.features[1].running_mean, first_conv.mean(dim=(0, 2, 3)))
        if clean_bn:
            # Ten batches of 100: the mean of their variances, close to the variance over all 1,000.
            torch.testing.assert_close(model.features[1].running_var, first_conv.var(dim=(0, 2, 3)),
                                       rtol=0.02, atol=0)
    torch.testing.assert_close(*means[True])
    # Without it the statistics are a running average over the augmented batches, and differ.
    assert not torch.allclose(*means[False], rtol=1e-3, atol=1e-4)


def test_a_run_too_short_for_its_weight_average_tests_and_keeps_the_model_itself():
    runs = {decay: train(ema=decay) for decay in (0.0, 0.99, 0.5)}  # 20 steps
    # 0.99 ** 20 = 82% of the initial weights would be left: no average, the same run as --ema 0.
    assert without_timings(runs[0.99][1]) == without_timings(runs[0.0][1])
    assert same_weights(runs[0.99][0], runs[0.0][0])
    # 0.5 ** 20: nothing left of them; the average is tested and kept.
    assert runs[0.5][1][-1]["test_loss"] != runs[0.0][1][-1]["test_loss"]
    assert not same_weights(runs[0.5][0], runs[0.0][0])
    # The model fit leaves is the average it tested.
    tested = evaluate(runs[0.5][0], make_loaders(TrainConfig(**SMALL), CPU)[1])
    assert tested["loss"] == pytest.approx(runs[0.5][1][-1]["test_loss"], rel=1e-6)
    assert utils.steps_to_forget(0.99) == 459 and 0.99 ** 459 <= 0.01 < 0.99 ** 458


def test_the_weight_average_is_an_ema_of_every_step_weights_and_batchnorm_statistics_from_the_start():
    torch.manual_seed(0)
    model = Net()
    averaged, by_hand = average_of(model, 0.9), {name: v.clone() for name, v in model.state_dict().items()}
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for _ in range(3):
        optimizer.zero_grad()
        F.nll_loss(model(torch.randn(8, 1, 28, 28)), torch.randint(0, 10, (8,))).backward()
        optimizer.step()
        averaged.update_parameters(model)
        by_hand = {name: torch.lerp(v, model.state_dict()[name], 0.1) if v.is_floating_point() else v
                   for name, v in by_hand.items()}
    floating = {name: v for name, v in averaged.module.state_dict().items() if v.is_floating_point()}
    torch.testing.assert_close(floating, {name: by_hand[name] for name in floating}, rtol=0, atol=1e-7)


@pytest.mark.parametrize(("steps", "warmup"), [(100, 0.25), (100, 0.5), (4, 0.25), (2, 0.5), (1, 0.25)])
def test_the_schedule_rises_for_the_warmup_fraction_then_anneals_however_few_the_steps(steps, warmup):
    # OneCycleLR divides by zero when the warm-up is exactly one step: --train-limit 1000 --epochs 1.
    optimizer, scheduler = make_optimizer(Net(), TrainConfig(lr=0.4, warmup=warmup), total_steps=steps)
    rates = []
    for _ in range(steps):
        rates.append(scheduler.get_last_lr()[0])
        optimizer.step()
        scheduler.step()
    assert all(0 < rate <= 0.4 + 1e-9 for rate in rates)
    if steps == 100:
        assert rates[0] == pytest.approx(0.4 / 25)
        peak = max(range(100), key=rates.__getitem__)
        assert abs(peak - warmup * 100) <= 1 and rates[peak] == pytest.approx(0.4) and rates[-1] < 0.001
    assert optimizer.param_groups[0]["nesterov"] and optimizer.param_groups[0]["weight_decay"] == 5e-4


def test_progress_bars_move_and_end_complete_for_training_and_test(monkeypatch):
    bars, losses_shown = [], []

    class RecordingBar(utils.tqdm):
        def set_postfix(self, **kwargs):
            losses_shown.append(kwargs["loss"])
            super().set_postfix(**kwargs)

        def close(self):
            if not self.disable:
                bars.append((self.desc, self.n, self.total))
            super().close()

    monkeypatch.setattr(utils, "tqdm", RecordingBar)
    # 50 batches of 20, the last one short; 500 test images in 25 batches.
    config = TrainConfig(**{**SMALL, "epochs": 1, "batch_size": 20, "train_limit": 990})
    fit(prepare_model(Net(), CPU), *make_loaders(config, CPU), config, progress=True, log=lambda line: None)
    assert bars == [("epoch 1 train", 50, 50), ("test", 25, 25)]
    # The running loss is read every utils.READ_EVERY batches and at the last one, and changes.
    reads = len(range(utils.READ_EVERY, 50, utils.READ_EVERY)) + 1
    assert len(losses_shown) == len(set(losses_shown)) == reads


class PoisonedLoader:
    """Yields the real batches, but NaN images in one batch of one epoch."""

    def __init__(self, loader, epoch, batch):
        self.loader, self.poison, self.epoch, self.generator = loader, (epoch, batch), 0, loader.generator

    def __len__(self):
        return len(self.loader)

    def __iter__(self):
        self.epoch += 1
        for batch, (images, labels) in enumerate(self.loader, start=1):
            yield (images * float("nan") if (self.epoch, batch) == self.poison else images), labels


def test_a_non_finite_loss_stops_naming_epoch_and_batch_and_what_is_kept(tmp_path):
    config = TrainConfig(**{**SMALL, "epochs": 3})
    train_loader, test_loader = make_loaders(config, CPU)
    for epoch, checkpoint in ((2, tmp_path / "not-yet-made" / "checkpoint.pt"), (1, tmp_path / "c.pt")):
        with pytest.raises(NonFiniteLossError) as caught:
            fit(Net(), PoisonedLoader(train_loader, epoch=epoch, batch=3), test_loader, config,
                checkpoint=checkpoint, progress=False, log=lambda line: None)
        kept = (f"the checkpoint of epoch 1 is kept in {checkpoint}" if epoch == 2 else
                "no epoch had finished, so there is no checkpoint yet")
        assert str(caught.value) == (f"training loss became non-finite at epoch {epoch}, batch 3 of 10: "
                                     f"lower --lr or check the input data; {kept}")
    state = read_checkpoint(tmp_path / "not-yet-made" / "checkpoint.pt")  # fit made the folder
    assert state["epoch"] == 1 and not (tmp_path / "c.pt").exists()
    assert all(torch.isfinite(tensor).all() for tensor in state["model"].values()
               if tensor.is_floating_point())


@pytest.fixture
def float64():
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)


@pytest.mark.parametrize("settings", [{"ema": 0.0}, {"ema": 0.9, "label_smoothing": 0.1}, {"momentum": 0.0},
                                      {"momentum": 0.5, "weight_decay": 0.0}])
def test_the_static_step_updates_as_the_eager_loop_does(settings, float64):
    # In float64: in float32 the two orders of summation differ by rounding, and where that flips a ReLU
    # or a max-pool the gap jumps to 1e-4 within 10 steps on some CPUs (seen on an AMD EPYC, not on an
    # Intel Xeon). In float64 they agree to 1e-15 at the recipe's peak. No dropout: no masks to differ.
    config = TrainConfig(**settings)
    torch.manual_seed(0)
    images, labels = torch.randn(48, 1, 28, 28), torch.randint(0, 10, (48,))
    batches = [(images[index % 3 * 16:][:16], labels[index % 3 * 16:][:16]) for index in range(10)]
    models, averages, sums = [Net(dropout=0.0), Net(dropout=0.0)], [], []
    models[1].load_state_dict(models[0].state_dict())
    for model, static in zip(models, (False, True)):
        optimizer, scheduler = make_optimizer(model, config, total_steps=10)
        averaged = average_of(model, config.ema)
        step = StaticStep(model, optimizer, scheduler, config, averaged) if static else None
        sums.append(train_epoch(model, batches, optimizer, scheduler, averaged=averaged,
                                label_smoothing=config.label_smoothing, static_step=step, progress=False))
        averages.append(averaged)
    torch.testing.assert_close(models[1].state_dict(), models[0].state_dict(), rtol=1e-9, atol=1e-12)
    assert sums[1]["train_acc"] == sums[0]["train_acc"]
    assert sums[1]["train_loss"] == pytest.approx(sums[0]["train_loss"], rel=1e-9)
    if config.ema:
        torch.testing.assert_close(averages[1].state_dict(), averages[0].state_dict(), rtol=1e-9, atol=1e-12)


CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@CUDA
@pytest.mark.parametrize("step", ["eager", "graph"])
def test_cuda_runs_with_one_seed_are_identical(step):
    (first, first_history), (second, second_history) = (
        train(seed=1, train_limit=3000, step=step, device=torch.device("cuda")) for _ in range(2))
    assert without_timings(first_history) == without_timings(second_history) and same_weights(first, second)


@CUDA
def test_the_cuda_graph_trains_as_the_static_step_does():
    (static, static_history), (graph, graph_history) = (  # 2 epochs of 30 batches
        train(seed=2, train_limit=3000, step=step, ema=0.9, device=torch.device("cuda"))
        for step in ("static", "graph"))
    for (name, a), b in zip(static.state_dict().items(), graph.state_dict().values()):
        torch.testing.assert_close(b, a, rtol=1e-3, atol=1e-4, msg=name)
    for row, again in zip(static_history, graph_history):
        assert again["train_loss"] == pytest.approx(row["train_loss"], rel=1e-3)


def test_the_range_test_sweeps_the_rate_up_and_puts_the_weights_back():
    config = TrainConfig(**{**SMALL, "batch_size": 50})
    torch.manual_seed(0)
    model = Net()
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    result = utils.lr_range_test(model, make_loaders(config, CPU)[0], config, iterations=60, progress=False)
    rates = result["lr"]
    assert len(rates) == len(result["loss"]) <= 60 and rates[0] == pytest.approx(1e-4)
    assert all(later > earlier for earlier, later in itertools.pairwise(rates))
    lowest = min(range(len(rates)), key=result["loss"].__getitem__)
    assert rates[10] <= result["suggested_lr"] <= rates[lowest] and "falls fastest" in result["rule"]
    assert min(result["loss"]) < result["loss"][0] - 0.2  # the loss falls somewhere on the way up
    assert all(torch.equal(tensor, before[name]) for name, tensor in model.state_dict().items())
    assert report.plot_lr_range(result, recipe_lr=0.2).axes[0].get_xscale() == "log"


def test_auto_picks_the_accelerator_torch_names_then_the_cpu(monkeypatch):
    for kind, expected in (("mps", "mps"), ("cuda", "cuda"), ("xpu", "cpu"), (None, "cpu")):
        accelerator = SimpleNamespace(is_available=lambda kind=kind: kind is not None,
                                      current_accelerator=lambda kind=kind: torch.device(kind))
        monkeypatch.setattr(torch, "accelerator", accelerator, raising=False)
        assert utils.pick_device("auto").type == expected
    # Older torch, without torch.accelerator: CUDA, then MPS, then the CPU.
    monkeypatch.delattr(torch, "accelerator", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    assert utils.pick_device("auto").type == "mps"
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    assert utils.pick_device("auto").type == "cpu"


# --- before training: the model, the settings -----------------------------------------------------

class Logits(nn.Module):
    def __init__(self, outputs=10, then=lambda x: x):
        super().__init__()
        self.fc, self.then = nn.Linear(784, outputs), then

    def forward(self, x):
        return self.then(self.fc(x.flatten(1)))


@pytest.mark.parametrize(("model", "words"), [
    (Logits(), "Logits returns scores (logits: exp of a row sums to"),
    (Logits(then=lambda x: x.softmax(dim=1)),
     ("Logits returns probabilities (softmax), not log-probabilities: end its forward with "
      "F.log_softmax(x, dim=1)")),
    (Logits(7, then=lambda x: x.log_softmax(dim=1)),
     "Logits returns shape (2, 7) for 2 images: its last layer must give 10 outputs"),
    (Logits(then=lambda x: (x, x)), "Logits returns a tuple, not a tensor"),
    (nn.Sequential(nn.Flatten(), nn.Linear(100, 10)),
     ("Sequential's forward fails on a batch shaped (2, 1, 28, 28) (RuntimeError: mat1 and mat2 shapes "
      "cannot be multiplied")),
    (nn.Sequential(nn.ReLU()), "Sequential has no parameters to train"),
    (Net().double(), "Net's weights are float64, and training here is in float32"),
])
def test_a_model_that_cannot_train_is_refused_in_one_line_before_training(model, words):
    with pytest.raises(ConfigError) as caught:
        prepare_model(model, CPU)
    assert words in str(caught.value) and "\n" not in str(caught.value), caught.value


def test_channels_last_where_the_forward_allows_it_else_the_standard_layout_with_a_note():
    lines = []
    assert prepare_model(Net(), CPU, log=lines.append).features[0].weight.is_contiguous(
        memory_format=torch.channels_last) and not lines
    model = prepare_model(LinearNet(), CPU, log=lines.append)
    assert model.conv2.weight.is_contiguous() and len(lines) == 1
    assert lines[0].startswith("note: LinearNet trains in the standard memory layout: in channels_last")
    assert "view size is not compatible" in lines[0] and "x.flatten(1) instead of x.view" in lines[0]


def test_fit_answers_settings_edited_after_make_config_and_odd_arguments_in_one_line(tmp_path):
    config = make_config(**SMALL)
    loaders = make_loaders(config, CPU)
    config.epochs = 0
    with pytest.raises(ConfigError, match="epochs must be at least 1, got 0"):
        fit(Net(), *loaders, config)
    with pytest.raises(ConfigError, match="the model is a Net and the settings are for NetTiny"):
        fit(Net(), *loaders, make_config(**SMALL, model="NetTiny"))
    with pytest.raises(ConfigError, match="fit needs a TrainConfig"):
        fit(Net(), [], [], {"epochs": 1})
    with pytest.raises(ConfigError, match="checkpoint is empty"):
        fit(Net(), *loaders, make_config(**SMALL), checkpoint="")
    with pytest.raises(ConfigError, match="step 'graph' captures CUDA graphs, and the device is cpu"):
        fit(Net(), *loaders, make_config(**SMALL, step="graph"))
    config = make_config(**SMALL)
    config.dry_run = True  # after make_config: still a dry run of one epoch
    assert len(fit(Net(), *loaders, config, checkpoint=tmp_path / "run", log=lambda line: None)) == 1
    assert (tmp_path / "run" / "checkpoint.pt").exists()  # a folder stands for its checkpoint.pt


@pytest.mark.parametrize(("change", "words"), [
    (lambda state: state.pop("optimizer"), "lacks optimizer"),
    (lambda state: state["config"].update(depth=3), "has unknown settings depth"),
    (lambda state: state["config"].update(lr=0.3), "was made with other settings than these (lr 0.3 -> 0.2"),
    (lambda state: state.update(definition="another"), "Net in model.py has changed since checkpoint"),
])
def test_a_checkpoint_that_cannot_be_resumed_is_refused_in_one_line(tmp_path, change, words):
    train(epochs=1, checkpoint=tmp_path / "c.pt")
    state = torch.load(tmp_path / "c.pt", weights_only=True)
    change(state)
    torch.save(state, tmp_path / "c.pt")
    with pytest.raises(CheckpointError, match=words.replace("(", r"\(")) as caught:
        train(epochs=1, checkpoint=tmp_path / "c.pt", resume=True)
    assert "\n" not in str(caught.value)
    (tmp_path / "c.pt").write_bytes((tmp_path / "c.pt").read_bytes()[:5000])
    with pytest.raises(CheckpointError, match="is unreadable .* truncated or corrupt"):
        train(epochs=1, checkpoint=tmp_path / "c.pt", resume=True)


def test_load_weights_takes_a_run_its_files_or_a_state_dict_and_hints_where_they_do_not_fit(tmp_path):
    model, _ = train(epochs=1, ema=0.5, checkpoint=tmp_path / "checkpoint.pt")
    torch.save(model.state_dict(), tmp_path / "model.pt")
    checkpoint = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    prefixed = {f"module.{key}": value for key, value in model.state_dict().items()}
    for source in (tmp_path, tmp_path / "model.pt", tmp_path / "checkpoint.pt", checkpoint["averaged"],
                   prefixed):
        assert same_weights(load_weights(Net(), source), model)
    with pytest.raises(RuntimeError) as caught:
        load_weights(Net(), NetCompact().state_dict())
    message = str(caught.value)
    assert "Missing key(s) in state_dict" in message  # PyTorch's own list stays
    assert message.endswith("\nhint: they are weights of NetCompact: load them into NetCompact()")
    one_missing = {key: value for key, value in model.state_dict().items() if key != "classifier.bias"}
    with pytest.raises(RuntimeError,
                       match=r"hint: Net in model.py may have changed since they were saved \(keys "
                                           r"missing: classifier.bias; unexpected: none\)"):
        load_weights(Net(), one_missing)
    with pytest.raises(ValueError, match="'epoch' holds a int, where a state dict holds tensors"):
        load_weights(Net(), {"epoch": 3})
    with pytest.raises(TypeError, match="expected a state dict"):
        load_weights(Net(), [1, 2])
    assert build_model("Net").load_state_dict(torch.load(tmp_path / "model.pt")) is not None  # plain torch
