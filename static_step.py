"""The training step of ``--step static`` and ``--step graph``: the step that train_epoch writes out
(forward, loss, backward, SGD with Nesterov momentum and weight decay, the one-cycle schedule, the
weight average), as fixed tensors and tensor ops only, so that on CUDA it can be captured once in a
CUDA graph and replayed for every batch (PyTorch's whole-network capture: the GPU then no longer waits
on Python and kernel launches between a step's ~100 small kernels).

Off by default and not yet measured on a GPU (RESULTS.md#gpu). utils.fit imports it only when asked.

    step = StaticStep(model, optimizer, scheduler, config, averaged, capture=True)
    loss, log_probs = step(images, labels)   # the model, optimizer, schedule and average have moved on
"""

import itertools

import torch
import torch.nn.functional as F


class StaticStep:
    """Each batch is copied into a fixed input buffer; the learning rate and the momentum are 0-dim
    tensors that the one-cycle schedule writes before each step; the SGD update is written out with
    foreach ops that read them, on the optimizer's own momentum buffers, so that checkpoints are the same
    as the eager loop's; the weight average is updated inside. With ``capture`` (CUDA only), one graph per
    batch size is captured the first time that size comes; without, the same ops run one by one, which
    is how the CPU tests check it against the eager loop.

    Calling it runs one step and returns (loss, log-probabilities) of the batch, as tensors that the next
    call overwrites.
    """

    def __init__(self, model, optimizer, scheduler, config, averaged=None, capture=False):
        device = next(model.parameters()).device
        self.model, self.scheduler, self.averaged, self.capture = model, scheduler, averaged, capture
        self.label_smoothing = config.label_smoothing
        self.group = optimizer.param_groups[0]  # the scheduler writes its lr and momentum
        self.weight_decay, self.nesterov = self.group["weight_decay"], self.group["nesterov"]
        self.uses_momentum = self.group["momentum"] > 0
        self.params = list(model.parameters())
        for param in self.params:  # a zero buffer gives torch's first step exactly: 0.9 * 0 + g = g
            if optimizer.state[param].get("momentum_buffer") is None:
                optimizer.state[param]["momentum_buffer"] = torch.zeros_like(param)
        self.momentum_buffers = [optimizer.state[param]["momentum_buffer"] for param in self.params]
        # Private: the scheduler warns "lr_scheduler.step() before optimizer.step()" unless this flag is
        # set, and optimizer.step() never runs here (the update below does its work).
        optimizer._opt_called = True
        self.lr, self.momentum = torch.zeros((), device=device), torch.zeros((), device=device)
        self.inputs, self.graphs, self.outputs = {}, {}, None
        if averaged is not None:  # (average's tensors, model's tensors), floating and integer apart
            pairs = list(zip(itertools.chain(averaged.module.parameters(), averaged.module.buffers()),
                             itertools.chain(model.parameters(), model.buffers())))
            groups = ([pair for pair in pairs if pair[0].is_floating_point() == floating]
                      for floating in (True, False))
            self.average_pairs = [tuple(map(list, zip(*group))) for group in groups if group]

    def __call__(self, images, labels):
        size = len(labels)
        if size not in self.inputs:
            self.inputs[size] = (torch.empty_like(images), torch.empty_like(labels))
        static_images, static_labels = self.inputs[size]
        static_images.copy_(images)
        static_labels.copy_(labels)
        self.lr.fill_(self.group["lr"])
        self.momentum.fill_(self.group["momentum"])
        if self.capture:
            if size not in self.graphs:
                self.graphs[size] = self.capture_graph(static_images, static_labels)
            graph, outputs = self.graphs[size]
            graph.replay()
        else:
            outputs = self.step(static_images, static_labels)
        self.scheduler.step()
        return outputs

    def step(self, images, labels):
        self.model.zero_grad(set_to_none=True)
        log_probs = self.model(images)
        loss = F.cross_entropy(log_probs, labels, label_smoothing=self.label_smoothing)
        loss.backward()
        with torch.no_grad():
            # Private torch._foreach_* ops: one kernel per op over all parameters, which is what
            # torch.optim.SGD itself runs (foreach=True), written out here so that the learning rate and
            # momentum can be tensors a graph reads instead of Python floats it would freeze.
            grads = [param.grad for param in self.params]
            if self.weight_decay:
                torch._foreach_add_(grads, self.params, alpha=self.weight_decay)
            if self.uses_momentum:
                torch._foreach_mul_(self.momentum_buffers, self.momentum)
                torch._foreach_add_(self.momentum_buffers, grads)
                if self.nesterov:
                    torch._foreach_add_(grads, torch._foreach_mul(self.momentum_buffers, self.momentum))
                else:
                    grads = self.momentum_buffers
            torch._foreach_add_(self.params, torch._foreach_mul(grads, -self.lr))
            if self.averaged is not None:
                self.update_average()
        return loss.detach(), log_probs.detach()

    def update_average(self):
        # AveragedModel.update_parameters without its Python branch on n_averaged, which a graph cannot
        # hold; average_of() made the first, copying call, so every later call averages. This reads
        # AveragedModel's attributes multi_avg_fn and n_averaged, which are not documented API.
        for mine, theirs in self.average_pairs:
            self.averaged.multi_avg_fn(mine, theirs, self.averaged.n_averaged)
        self.averaged.n_averaged += 1

    def capture_graph(self, images, labels):
        """(graph, its outputs): one step captured on these input buffers, following PyTorch's documented
        whole-network capture: a few warm-up steps on a side stream, then the capture. Both run the step
        for real, so every tensor they change (weights, statistics, buffers, the random state) is put
        back."""
        device = images.device
        state = [*self.model.state_dict().values(), *self.momentum_buffers]
        if self.averaged is not None:
            state += [*self.averaged.state_dict().values()]
        saved, rng = [tensor.clone() for tensor in state], torch.cuda.get_rng_state(device)
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            for _ in range(3):
                self.step(images, labels)
        torch.cuda.current_stream(device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        self.model.zero_grad(set_to_none=True)
        with torch.cuda.graph(graph):
            outputs = self.step(images, labels)
        with torch.no_grad():
            for tensor, before in zip(state, saved):
                tensor.copy_(before)
        torch.cuda.set_rng_state(rng, device)
        return graph, outputs
