"""Latency of the dynamic (gated) network against the exported dense subnets of its routes.

The supernet has random weights and a gate in its default place with the default routes. The gate's slimming
head is set so that a pool of random inputs spreads evenly over the routes. Everything runs in eval mode with a
fixed thread count (on CUDA, synchronised around each call). The functions compared are interleaved repeat by
repeat after a warm-up, their order reversing every other repeat; each figure is a median.

- Batch 1, for an input routed to the smallest and one routed to the largest route: the gated network against
  the dense subnet of that route plus the gate alone on its input. Target: ratio ≤ 1.05. The supernet's own
  sliced forward at the route's plan is shown too: the part of the ratio that slicing costs, gate or no gate.
- A batch of 64 with mixed routes: the gated network, which groups the inputs by route and runs each group
  sliced, against the ideal, which is the sum of each route's dense subnet on its group of inputs. Target:
  ideal / dynamic ≥ 0.9. The gated network runs the layers before the gate on the whole batch at once, so a
  control shows what batch size alone does here: the widest route's dense subnet on the whole batch against the
  same images in groups of the same sizes.

- With --exported, the whole gated network as `python -m dsnet.export` writes it (BN folded), at batch 1: the
  torch.export program and the TorchScript module against their own parts called from Python (trunk, gate, the
  route's dense tail). Target: ratio ≤ 1.05. Also the realized speed-up of the narrowest route against the widest
  (the exported network on an input of each), next to their MAdds ratio.

    python bench/dynamic.py [--img-size 224] [--threads 2] [--device cuda] [--repeats 15] [--system-malloc]
                            [--exported]
"""
from __future__ import annotations

import argparse
import tempfile
import warnings
from pathlib import Path

import torch

import dsnet
from dsnet.cpu_memory import keep_freed_memory
from dsnet.dense_gated import export_gated, fold_gated, load_torch_export, save_torch_export
from dsnet.gate import GateConfig, GatedDSNet, default_routes, insert_gate
from dsnet.export import fold_batch_norms
from dsnet.timing import median_seconds, reserve_kernel_cache

from device import add_device_args, describe, setup_device


@torch.no_grad()
def spread_routes(gated: GatedDSNet, pool: torch.Tensor) -> torch.Tensor:
    """Set the slimming head so that route r takes the inputs of `pool` whose projection on a random direction of
    the squeezed features lies in the r-th quantile band. Returns the route of every input of the pool."""
    head = gated.gate.slimming
    num_routes = head.out_features
    direction = torch.randn(head.in_features, generator=torch.Generator().manual_seed(0))
    head.weight.copy_(torch.arange(num_routes, dtype=torch.float32)[:, None] * direction)
    head.bias.zero_()
    _, info = gated(pool, return_info=True)
    projection = info.route_logits[:, 1] if num_routes > 1 else info.route_logits[:, 0]
    thresholds = torch.quantile(projection, torch.arange(1, num_routes) / num_routes)
    # Logit r is r·t − (q_1 + … + q_r): the argmax is the number of thresholds below t.
    head.bias.copy_(-torch.cat([torch.zeros(1), torch.cumsum(thresholds, 0)]))
    return gated(pool, return_info=True)[1].routes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--small-input", action="store_true", help="small-input stem (use with --img-size 32)")
    parser.add_argument("--num-routes", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=64, help="the mixed batch (default 64)")
    parser.add_argument("--pool", type=int, default=128, help="random inputs the routes are spread over")
    add_device_args(parser)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--system-malloc", action="store_true",
                        help="leave glibc's malloc returning freed memory to the OS; by default it keeps it, as "
                             "eval.py and train.py do")
    parser.add_argument("--exported", action="store_true",
                        help="also time the exported gated network (torch.export and TorchScript) at batch 1")
    args = parser.parse_args()
    reserve_kernel_cache()  # before the first convolution: the interleaved loop times many networks
    device = setup_device(parser, args)
    kept = not args.system_malloc and keep_freed_memory()
    size = args.img_size
    supernet = dsnet.create_supernet(num_classes=1000, small_input=args.small_input, img_size=size).eval()
    config = GateConfig(routes=default_routes(supernet.widths, args.num_routes), input_width=supernet.widths[-1])
    gated = insert_gate(supernet, config, [torch.randn(8, 3, size, size)]).eval()  # BN statistics of the routes
    pool = torch.randn(args.pool, 3, size, size)
    spread_routes(gated, pool)
    dense = [dsnet.export_subnet(gated.supernet, plan).to(device) for plan in gated.route_plans]
    gated, pool = gated.to(device), pool.to(device)
    with torch.no_grad():
        pool_routes = gated(pool, return_info=True)[1].routes  # on the device: its arithmetic decides close calls
    madds = gated.route_madds(size)
    print(f"torch {torch.__version__}, {describe(device, args.threads)}, {size} px, medians of {args.repeats}; gate in "
          f"{config.block}, layers before it at width {config.input_width:g}, "
          f"{'freed memory kept' if kept else 'freed memory returned to the OS'}")
    print("routes: " + ", ".join(f"{w:g} ({m / 1e6:.1f}M MAdds)" for w, m in zip(config.routes, madds.tolist())))

    print(f"{'route':>6} {'batch':>5} {'dynamic ms':>11} {'dense ms':>9} {'gate ms':>8} {'ratio':>7} "
          f"{'sliced ms':>10} {'sliced/dense':>13}")
    worst = 0.0
    for route in (0, len(dense) - 1):
        x = pool[pool_routes == route][:1]
        h = gated.gate_features(x)
        plan = gated.route_plans[route]
        dynamic_s, dense_s, gate_s, sliced_s = median_seconds(
            [lambda: gated(x), lambda: dense[route](x), lambda: gated.gate(h), lambda: gated.supernet(x, plan)],
            args.repeats, args.warmup, device)
        ratio = dynamic_s / (dense_s + gate_s)
        worst = max(worst, ratio)
        print(f"{config.routes[route]:>6g} {1:>5} {dynamic_s * 1e3:>11.2f} {dense_s * 1e3:>9.2f} "
              f"{gate_s * 1e3:>8.3f} {ratio:>7.3f} {sliced_s * 1e3:>10.2f} {sliced_s / dense_s:>13.3f}", flush=True)

    per_route = args.batch_size // len(dense)
    picks = torch.cat([(pool_routes == r).nonzero().squeeze(1)[:per_route] for r in range(len(dense))]).cpu()
    batch = pool[picks[torch.randperm(len(picks), generator=torch.Generator().manual_seed(1))].to(device)]
    with torch.no_grad():
        routes = gated(batch, return_info=True)[1].routes
    groups = [batch[routes == r] for r in range(len(dense))]
    present = [r for r in range(len(dense)) if len(groups[r])]
    widest = dense[-1]
    calls = ([lambda: gated(batch)] + [lambda r=r: dense[r](groups[r]) for r in present]
             + [lambda: widest(batch), lambda: [widest(groups[r]) for r in present]])
    times = median_seconds(calls, args.repeats, args.warmup, device)
    dynamic_s, ideal_s = times[0], sum(times[1:1 + len(present)])
    whole_s, grouped_s = times[-2], times[-1]
    sizes = ", ".join(f"{w:g}: {len(g)}" for w, g in zip(config.routes, groups))
    print(f"mixed batch of {len(batch)} ({sizes}): dynamic {dynamic_s * 1e3:.1f} ms, ideal (dense subnets on their "
          f"groups) {ideal_s * 1e3:.1f} ms")
    print(f"control: dense subnet of route {config.routes[-1]:g} on all {len(batch)} images {whole_s * 1e3:.1f} ms, "
          f"on the same groups {grouped_s * 1e3:.1f} ms (batch-size effect {grouped_s / whole_s:.3f})")
    print(f"max batch-1 ratio {worst:.3f} (target ≤ 1.05)")
    print(f"mixed-batch throughput vs ideal {ideal_s / dynamic_s:.3f} (target ≥ 0.9); with the ideal scaled by the "
          f"batch-size effect {ideal_s * whole_s / grouped_s / dynamic_s:.3f}")
    if args.exported:
        time_exported(gated, pool, pool_routes, madds, args, device)


def time_exported(gated: GatedDSNet, pool: torch.Tensor, pool_routes: torch.Tensor, madds: torch.Tensor, args,
                  device: torch.device) -> None:
    dense = fold_gated(export_gated(gated), fold_batch_norms).to(device)
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        save_torch_export(dense, pool[:2], Path(tmp) / "gated.pt2")
        program = load_torch_export(Path(tmp) / "gated.pt2")
        torch.jit.save(torch.jit.script(dense), str(Path(tmp) / "gated.torchscript"))
        scripted = torch.jit.load(str(Path(tmp) / "gated.torchscript"), map_location=device)
    print(f"\nexported gated network at batch 1 (BN folded), against its parts called from Python")
    print(f"{'route':>6} {'export ms':>10} {'script ms':>10} {'parts ms':>9} {'export/parts':>13} {'script/parts':>13}")
    worst, seconds = {"export": 0.0, "script": 0.0}, {}
    narrow, wide = 0, len(dense.tails) - 1
    for route in (narrow, wide):
        x = pool[pool_routes == route][:1]
        tail = dense.tails[route]
        export_s, script_s, parts_s = median_seconds(
            [lambda: program(x), lambda: scripted(x), lambda: tail(dense.gate(dense.trunk(x))[0])],
            args.repeats, args.warmup, device)
        worst = {"export": max(worst["export"], export_s / parts_s), "script": max(worst["script"], script_s / parts_s)}
        seconds[route] = {"export": export_s, "script": script_s}
        print(f"{gated.route_widths[route]:>6g} {export_s * 1e3:>10.2f} {script_s * 1e3:>10.2f} {parts_s * 1e3:>9.2f} "
              f"{export_s / parts_s:>13.3f} {script_s / parts_s:>13.3f}", flush=True)
    print(f"max exported/parts ratio: torch.export {worst['export']:.3f}, TorchScript {worst['script']:.3f} "
          "(target ≤ 1.05)")
    speedup = {k: seconds[wide][k] / seconds[narrow][k] for k in ("export", "script")}
    print(f"realized speed-up of route {gated.route_widths[narrow]:g} over {gated.route_widths[wide]:g} at batch 1: "
          f"torch.export {speedup['export']:.2f}×, TorchScript {speedup['script']:.2f}×; MAdds ratio "
          f"{madds[wide] / madds[narrow]:.2f}×")


if __name__ == "__main__":
    main()
