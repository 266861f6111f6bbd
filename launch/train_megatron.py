"""Train a Megatron-core GPT whose MLPs are trilemma_moe layers (``gpt_layer_spec``), one rank per
process under torchrun; the same script on a CPU machine (gloo) and on GPUs (NCCL):

    torchrun --nproc-per-node 2 launch/train_megatron.py --ep 2 --steps 300            # CPU: 2 gloo ranks
    torchrun --nproc-per-node 8 launch/train_megatron.py --ep 4 --bf16 --data DIR      # 8 GPUs
    ... --save ckpt/ then --load ckpt/ (at any --ep dividing --groups) to resume

GPUs: Megatron's DistributedDataParallel, finalize_model_grads and get_megatron_optimizer
(Float16OptimizerWithFloat16Params with --bf16, else FP32Optimizer; the DistributedOptimizer is
refused by attach_megatron_optimizer). CPU: Megatron's DDP and optimizers allocate on CUDA, so a
torch Adam and ``megatron_train.reduce_gradients`` (the same reduction rule) stand in, and
MEGATRON's attention and checkpoint writer get the CPU stand-ins of
``trilemma_moe/integrations/megatron_cpu.py`` (our layer needs none).

Each rank reads its own data (the generated topic corpus, or WikiText with --data; a sampler
seeded by the rank). Printed every --log-every steps on rank 0: the loss averaged over ranks,
Megatron's reduced aux-loss metrics (``track_moe_metrics``: our balance and z losses, unweighted,
averaged over layers and steps) and the first layer's clustering state.
"""
import argparse
import contextlib
import os
import sys
import time

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron.core import parallel_state
from megatron.core.models.gpt import GPTModel
from megatron.core.transformer.moe.moe_utils import (
    clear_aux_losses_tracker,
    track_moe_metrics,
)
from megatron.core.transformer.transformer_config import TransformerConfig

from trilemma_moe.data import BatchSampler, SyntheticTopicCorpus, load_wikitext
from trilemma_moe.integrations.megatron import attach_megatron_optimizer, gpt_layer_spec
from trilemma_moe.integrations.megatron_cpu import (
    causal_mask,
    cpu_attention_substitutes,
)
from trilemma_moe.integrations.megatron_train import (
    load_checkpoint,
    reduce_gradients,
    save_checkpoint,
)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ep", type=int, default=1, help="expert_model_parallel_size")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--ffn", type=int, default=128)
    p.add_argument("--experts", type=int, default=16)
    p.add_argument("--groups", type=int, default=4, help="moe_router_num_groups (our G)")
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--rank", type=int, default=8, help="residual rank r")
    p.add_argument("--burn-in", type=int, default=100)
    p.add_argument("--recluster-interval", type=int, default=50)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--micro-batch", type=int, default=8, help="sequences per rank per step")
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--bf16", action="store_true", help="bf16 parameters (GPUs)")
    p.add_argument("--data", help="WikiText directory (default: the generated topic corpus)")
    p.add_argument("--log-every", type=int, default=25)
    p.add_argument("--save", help="dist-checkpoint directory written at the end")
    p.add_argument("--load", help="dist-checkpoint directory to resume from")
    return p.parse_args(argv)


def setup(args):
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl" if cuda else "gloo")
    parallel_state.initialize_model_parallel(1, 1, expert_model_parallel_size=args.ep)
    if cuda:
        from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed
        model_parallel_cuda_manual_seed(1234)
    return cuda


def build(args, cuda, vocab):
    config = TransformerConfig(
        num_layers=args.layers, hidden_size=args.hidden, num_attention_heads=args.heads, ffn_hidden_size=args.ffn,
        use_cpu_initialization=not cuda, hidden_dropout=0.0, attention_dropout=0.0, bf16=args.bf16,
        params_dtype=torch.bfloat16 if args.bf16 else torch.float32,
        num_moe_experts=args.experts, moe_router_topk=args.top_k, moe_router_num_groups=args.groups,
        moe_router_group_topk=1, moe_aux_loss_coeff=0.01, moe_z_loss_coeff=0.001, expert_model_parallel_size=args.ep)
    knobs = {"rank": args.rank, "burn_in": args.burn_in, "recluster_interval": args.recluster_interval}
    torch.manual_seed(0)   # the same dense weights on every rank
    model = GPTModel(config, transformer_layer_spec=gpt_layer_spec(config, knobs), vocab_size=vocab,
                     max_sequence_length=args.seq_len)
    if not cuda:
        opt = torch.optim.Adam(model.parameters(), lr=args.lr)
        attach_megatron_optimizer(model, opt)
        return config, model, opt
    from megatron.core.distributed import (
        DistributedDataParallel,
        DistributedDataParallelConfig,
    )
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.transformer.module import Float16Module
    model = model.cuda()
    if args.bf16:
        model = Float16Module(config, model)
    model = DistributedDataParallel(config, DistributedDataParallelConfig(use_distributed_optimizer=False), model)
    opt = get_megatron_optimizer(OptimizerConfig(optimizer="adam", lr=args.lr, bf16=args.bf16, clip_grad=1.0,
                                                 use_distributed_optimizer=False), [model])
    attach_megatron_optimizer(model, opt)   # regroups move fp32 masters and Adam moments; steps are counted
    return config, model, opt


def main(argv=None):
    args = parse_args(argv)
    cuda = setup(args)
    rank, world = dist.get_rank(), dist.get_world_size()
    corpus = load_wikitext(args.data) if args.data else SyntheticTopicCorpus(vocab_size=512, seed=0)
    sampler = BatchSampler(corpus.train, args.seq_len, args.micro_batch, seed=rank)   # each rank its own data
    # CPU only: Megatron's attention needs its two CUDA-only calls replaced (megatron_cpu.py)
    with contextlib.nullcontext() if cuda else cpu_attention_substitutes():
        _config, model, opt = build(args, cuda, corpus.vocab_size)
        if args.load:
            load_checkpoint(model, opt, args.load)
        device = torch.device("cuda") if cuda else torch.device("cpu")
        mask, pos = causal_mask(args.seq_len).to(device), torch.arange(args.seq_len, device=device)
        layers = [m for m in model.modules() if type(m).__name__ == "TrilemmaMegatronMoE"]
        t0, since = time.time(), 0
        clear_aux_losses_tracker()
        for step in range(args.steps):
            x, y = (t.to(device) for t in next(sampler))
            if cuda:
                model.zero_grad_buffer()
            opt.zero_grad()
            loss = model(x, pos.expand_as(x), mask, labels=y).float().mean()
            loss.backward()
            if cuda:
                from megatron.core.distributed import finalize_model_grads
                finalize_model_grads([model])
            else:
                reduce_gradients(model)
            opt.step()
            since += 1
            if (step + 1) % args.log_every == 0 or step + 1 == args.steps:
                total = loss.detach().clone()
                dist.all_reduce(total)
                aux = {}
                track_moe_metrics(loss_scale=1.0 / since, iteration=step + 1, total_loss_dict=aux,
                                  num_layers=args.layers, track_names=["load_balancing_loss", "z_loss"])
                if rank == 0:
                    s = layers[0].stats()
                    print(f"step {step + 1}: loss {float(total) / world:.4f} balance {float(aux['load_balancing_loss']):.3f} "
                          f"z {float(aux['z_loss']):.3f} | layer 1: clustered {s['compressed']} reclusters "
                          f"{s['reclusters']} load_cv {s['load_cv']:.3f} | {time.time() - t0:.1f} s", flush=True)
                since = 0       # track_moe_metrics cleared the tracker
        if args.save:
            save_checkpoint(model, opt, args.save)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
