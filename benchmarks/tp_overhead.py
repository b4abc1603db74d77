"""What tensor parallelism costs on this machine beyond its sharded compute and collectives (cpu:2, gloo).

Two processes, tp = 2, the model's blocks (llama-tiny: 6, llama-small: 16), micro-batch 2 x seq 128, fp32, one
thread each; per step 4 micro-batches of forward + backward through the blocks, timed after 2 warm-up steps:

- ``dtensor``: the blocks sharded with torch's DTensor plan as paraplan's torch backend applies it
  (``torch_native.LLAMA_TP_PLAN``: q, k, v, gate, up ColwiseParallel; o, down RowwiseParallel);
- ``local + 7 all-reduces``: the same half-width blocks (heads, kv heads and FFN width halved) as plain modules,
  with the collectives the DTensor plan runs issued by hand: 2 all-reduces in forward, 5 in backward per block
  (``backend_profiles.DTENSOR_TP_COLLECTIVES``), each on the block's whole activation;
- ``local``: the half-width blocks alone.

``dtensor - local + 7 all-reduces`` per block and micro-batch is what the calibration's ``tp_overhead_s`` stands for
(DTensor dispatch and redistribution); ``local + 7 all-reduces - local`` the collectives' cost.

    torchrun --standalone --nproc-per-node 2 benchmarks/tp_overhead.py --model llama-tiny
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.distributed as dist


class _AllReduce(torch.autograd.Function):
    """Identity whose forward (``fwd=True``) or backward all-reduces over the default group."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, fwd: bool) -> torch.Tensor:
        ctx.fwd = fwd
        x = x.clone()
        if fwd:
            dist.all_reduce(x)
        return x

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.clone()
        if not ctx.fwd:
            dist.all_reduce(grad)
        return grad, None


def main() -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    from paraplan.backends.torch_native import LLAMA_TP_PLAN
    from paraplan.models.build import build_layer
    from paraplan.models.presets import load_model_spec

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="llama-tiny")
    parser.add_argument("--micro-batch", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--micro-batches", type=int, default=4)
    parser.add_argument("--steps", type=int, default=4)
    args = parser.parse_args()
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    tp = dist.get_world_size()
    spec = load_model_spec(args.model)
    mesh = init_device_mesh("cpu", (tp,))
    styles = {"ColwiseParallel": ColwiseParallel, "RowwiseParallel": RowwiseParallel}
    torch.manual_seed(0)
    sharded = [build_layer(spec, "block", i) for i in range(spec.n_layers)]
    for block in sharded:
        parallelize_module(block, mesh, {name: styles[style]() for name, style in LLAMA_TP_PLAN.items()})
    half = spec.model_copy(update={"n_heads": spec.n_heads // tp, "n_kv_heads": spec.n_kv_heads // tp,
                                   "ffn_hidden": spec.ffn_hidden // tp, "head_dim": spec.hidden // spec.n_heads})
    local = [build_layer(half, "block", i) for i in range(spec.n_layers)]
    x0 = torch.randn(args.micro_batch, args.seq_len, spec.hidden)

    def run(blocks, collectives: bool) -> None:
        h = x0.clone().requires_grad_(True)
        for block in blocks:
            h = block(h)
            if collectives:
                for fwd in (True, True, False, False, False, False, False):
                    h = _AllReduce.apply(h, fwd)
        h.sum().backward()

    def timed(fn) -> float:
        for _ in range(2 * args.micro_batches):
            fn()
        dist.barrier()
        t0 = time.perf_counter()
        for _ in range(args.steps * args.micro_batches):
            fn()
        dist.barrier()
        return (time.perf_counter() - t0) / args.steps

    res = {"dtensor": timed(lambda: run(sharded, False)),
           "local + 7 all-reduces": timed(lambda: run(local, True)),
           "local": timed(lambda: run(local, False))}
    if dist.get_rank() == 0:
        per = args.micro_batches * spec.n_layers / 1e3
        print(f"{args.model}, tp {tp}, {spec.n_layers} blocks, {args.micro_batches} micro-batches of "
              f"{args.micro_batch} x {args.seq_len}, per step:")
        for name, t in res.items():
            print(f"  {name:24s} {t:.3f} s")
        print(f"  DTensor overhead per block and micro-batch: "
              f"{(res['dtensor'] - res['local + 7 all-reduces']) / per:.1f} ms")
        print(f"  7 all-reduces per block and micro-batch:    "
              f"{(res['local + 7 all-reduces'] - res['local']) / per:.1f} ms")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
