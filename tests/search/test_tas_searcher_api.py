"""The method-neutral searcher API, with TAS as its first method: the keep-based architecture
dict, resume refusing another configuration, the global RNG left alone, and the hooks that let a
method choose its loop (a joint, in-order, un-augmented toy method)."""
import pytest
import torch
from torch import nn

from nasprune import flops, slim
from nasprune.data import load_dataset, tas_split
from nasprune.models import CifarResNet, ResNetSpec
from nasprune.search import TAS, Callback, Searcher
from nasprune.search.base import (ARCHITECTURE_KEYS, ConfigMismatchError, keep_architecture, layer_widths,
                                  pruned_architecture)

SIZE = 16


@pytest.fixture(scope="module")
def small_splits():
    train, _ = load_dataset(None, size=SIZE)
    w, a = tas_split(train)
    return w.subset(range(256)), a.subset(range(256))


def _tas(**kw):
    return TAS(CifarResNet(8), kw.pop("target", 0.5), input_size=SIZE, device="cpu", **kw)


def test_tas_architecture_is_keep_based_and_describes_the_export():
    s = _tas(seed=2)
    with torch.no_grad():
        s.model.width_logits.copy_(torch.randn(s.model.width_logits.shape, generator=torch.Generator().manual_seed(4)))
        s.model.depth_logits.zero_()
        s.model.depth_logits[1, 0] = 5.0            # stage 2 keeps one of its blocks
    arch = s.architecture()
    net = s.export(architecture=arch)
    x = torch.zeros(1, 3, SIZE, SIZE)
    assert set(ARCHITECTURE_KEYS) <= set(arch) and arch["method"] == "tas" and arch["blocks"][1] == 1
    assert arch["macs"] == flops.count(net, x) == arch["flops"]
    assert arch["params"] == flops.count_params(net)
    assert arch["base_macs"] == flops.count(CifarResNet(8), x) and arch["base_params"] == flops.count_params(CifarResNet(8))
    spec = ResNetSpec.cifar(1)
    rows = arch["layer_widths"]
    assert [r["name"] for r in rows] == ["conv1", "layer1.0.conv1", "layer1.0.conv2", "layer2.0.conv1",
                                         "layer2.0.conv2", "layer3.0.conv1", "layer3.0.conv2"]
    assert [r["original"] for r in rows] == spec.row_widths()
    assert [r["kept"] for r in rows] == spec.kept_widths(arch["widths"], arch["blocks"])
    # the kept widths are the export's conv widths
    convs = [net.stem.conv] + [c.conv for stage in net.stages for blk in stage for c in blk.convs]
    assert [r["kept"] for r in rows if r["kept"]] == [c.out_channels for c in convs]


def test_keep_architecture_and_layer_widths_of_a_slimmed_model():
    model = CifarResNet(8).eval()
    x = torch.zeros(1, 3, 32, 32)
    pruned = slim.uniform(model, x, 0.5)
    arch = pruned_architecture("uniform", model, pruned, x, ratio=0.5)
    assert arch["macs"] == flops.count(pruned, x) < flops.count(model, x)
    assert arch["params"] == flops.count_params(pruned) and arch["ratio"] == 0.5
    rows = {r["name"]: r for r in arch["layer_widths"]}
    assert rows["layer1.0.conv1"] == {"name": "layer1.0.conv1", "original": 16, "kept": 8}
    assert rows["linear"]["kept"] == rows["linear"]["original"] == 10
    assert layer_widths(model, nn.Sequential())[0]["kept"] == 0        # a removed layer keeps 0
    with pytest.raises(ValueError, match="outside 0..4"):
        keep_architecture("x", [{"name": "a", "original": 4, "kept": 5}], 1, 1)


def test_resume_refuses_a_checkpoint_of_another_configuration(small_splits, tmp_path):
    w, a = small_splits
    ckpt = tmp_path / "ckpt.safetensors"
    _tas(seed=0).search(w, a, epochs=1, batch_size=128, checkpoint=ckpt)
    other = _tas(seed=1, target=0.3)
    before = other.model.width_logits.detach().clone()
    with pytest.raises(ConfigMismatchError) as err:
        other.search(w, a, epochs=1, batch_size=128, checkpoint=ckpt, resume=True)
    message = str(err.value)
    assert "flops_target: checkpoint 0.5, this search 0.3" in message and "seed: checkpoint 0, this search 1" in message
    assert "tau" not in message                            # only the keys that differ
    assert torch.equal(other.model.width_logits, before) and other.global_step == 0   # nothing loaded
    with pytest.raises(ConfigMismatchError, match=r"search\.epochs: checkpoint 1, this search 2"):
        _tas(seed=0).search(w, a, epochs=2, batch_size=128, checkpoint=ckpt, resume=True)
    with pytest.raises(ConfigMismatchError, match=r"search\.batch_size\.weights: checkpoint 128, this search 64"):
        _tas(seed=0).search(w, a, epochs=1, batch_size=64, checkpoint=ckpt, resume=True)
    with pytest.raises(ConfigMismatchError, match=r"model\.layers: checkpoint \[1, 1, 1\], this search \[2, 2, 2\]"):
        TAS(CifarResNet(14), 0.5, input_size=SIZE, device="cpu").search(w, a, epochs=1, batch_size=128,
                                                                         checkpoint=ckpt, resume=True)
    same = _tas(seed=0)                                    # the same configuration resumes: all done
    same.search(w, a, epochs=1, batch_size=128, checkpoint=ckpt, resume=True)
    assert same.global_step == 2 and len(same.history) == 1


def test_tas_leaves_the_global_rng_alone_and_depends_on_its_seed(small_splits):
    w, a = small_splits
    model = CifarResNet(8)
    torch.manual_seed(9)
    before = torch.get_rng_state()
    s = TAS(model, 0.5, input_size=SIZE, device="cpu", seed=3)
    s.search(w, a, epochs=1, batch_size=128)
    for init in ("random", "base", "inherit"):
        s.export(init=init)
    assert torch.equal(torch.get_rng_state(), before)
    torch.manual_seed(10)                                  # another caller state, the same seed
    t = _tas(seed=3)
    assert torch.equal(t.model.width_logits, _tas(seed=3).model.width_logits)
    assert not torch.equal(t.model.width_logits, _tas(seed=4).model.width_logits)


class _Recorder(Callback):
    def __init__(self):
        self.events = []

    def on_search_begin(self, s):
        self.events.append(("begin", s.epochs * s.steps_per_epoch, s.global_step))

    def on_step_end(self, s, step, metrics):
        self.events.append(("step", step, sorted(metrics)))

    def on_search_end(self, s):
        self.events.append(("end",))


class _InOrderJoint(Searcher):
    """A method with no architecture split whose data is un-augmented and in order (as FFP's
    search set), stopping once it has seen `limit` samples: the loop is the method's."""
    method = "toy"

    def __init__(self, limit):
        super().__init__(seed=0, device="cpu")
        self.config, self.limit, self.seen = {"limit": limit}, limit, []

    def loaders(self, data, val_data, batch_size):
        assert val_data is None
        return {"search": self.loader(data, batch_size, shuffle=False, augment=False, drop_last=False)}

    def step(self, batch):
        self.seen.append(batch[1].clone())
        return {"n": float(batch[1].numel())}

    def finished(self):
        return sum(len(b) for b in self.seen) >= self.limit

    def architecture(self):
        return keep_architecture(self.method, [], 0, 0)


def test_hooks_let_a_method_choose_data_order_and_loop_shape(small_splits):
    w, _ = small_splits
    toy, rec = _InOrderJoint(limit=300), _Recorder()
    arch = toy.search(w, epochs=5, batch_size=100, callbacks=[rec])
    assert arch["method"] == "toy"
    # three batches an epoch (the last one short); stopped after the epoch that reached 300 samples
    assert [len(b) for b in toy.seen] == [100, 100, 56, 100, 100, 56]
    assert torch.equal(torch.cat(toy.seen[:3]), torch.as_tensor(w.labels))      # in order
    assert rec.events[0] == ("begin", 15, 0) and rec.events[1] == ("step", 1, ["n"])
    assert rec.events[-1] == ("end",) and toy.global_step == 6 and len(toy.history) == 2
