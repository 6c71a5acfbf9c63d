"""`mhr train`: windows + priors → a trained run in runs/<name>/."""

from __future__ import annotations

import typer

from mhr.cli.common import context, parse_list
from mhr.console import emit, err


def register(app: typer.Typer) -> None:
    @app.command("train")
    def train_cmd(
        ctx: typer.Context,
        backbone: str = typer.Option("hstu", help="Backbone: hstu or sasrec."),
        size: str = typer.Option("1", help="Backbone size: tiny, 1, 2, 3, 4, 1b (paper Table 5)."),
        priors: str = typer.Option("", help="Comma-separated built priors, e.g. item,temporal ('' = plain backbone)."),
        compose: str = typer.Option(
            "hierarchical", help="How several priors combine: flat, additive, multiplicative, hierarchical."
        ),
        global_head: bool = typer.Option(False, "--global-head/--no-global-head",
                                         help="Keep the backbone's own state as an extra head over all items."),
        score: str = typer.Option("cosine", help="cosine (shared learnable temperature) or dot."),
        temperature: float = typer.Option(0.05, help="Initial temperature of cosine scores."),
        negatives: str = typer.Option("full", help="'full' softmax over each head's group, or N sampled negatives."),
        negatives_from: str = typer.Option("group", help="Draw negatives from the head's group or the global pool."),
        global_negatives_ratio: float = typer.Option(0.0, help="Share of each head's negatives from the whole catalogue."),
        negatives_per: str = typer.Option(
            "position", help="Sampled negatives: one draw per batch (shared by all positions), per sequence, "
            "or per position (HSTU's reference sampler)."),
        in_batch_negatives: bool = typer.Option(
            False, "--in-batch-negatives/--no-in-batch-negatives",
            help="Sampled negatives: also use the batch's own targets as negatives (popularity-shaped)."),
        logq: bool = typer.Option(
            True, "--logq/--no-logq",
            help="Sampled negatives: correct each negative's logit by -log(expected copies), so the "
            "sampled sum estimates the full softmax (needed with --in-batch-negatives)."),
        router: bool = typer.Option(
            False, "--router/--no-router",
            help="Train a router p(k | h) over the heads jointly; rank with `mhr eval --fusion router`."),
        router_weight: float = typer.Option(1.0, help="Weight of the router's loss beside the heads' loss."),
        head_weights: str = typer.Option("frequency", help="frequency (w_k ∝ |Y_k|) or uniform."),
        gamma: float = typer.Option(0.99, help="Discount γ over the forecast horizon."),
        epochs: int = typer.Option(20, help="Epoch budget."),
        max_steps: int = typer.Option(None, help="Step budget (overrides --epochs)."),
        batch_size: int = typer.Option(64, help="Global batch size (windows per step)."),
        lr: float = typer.Option(1e-3, help="AdamW learning rate (warmup then cosine decay)."),
        weight_decay: float = typer.Option(0.0, help="AdamW weight decay."),
        warmup_steps: int = typer.Option(50, help="Linear warmup steps."),
        clip: float = typer.Option(1.0, help="Gradient-norm clipping (0 = off)."),
        eval_every: int = typer.Option(0, help="Validate every N steps (0 = once per epoch)."),
        patience: int = typer.Option(3, help="Stop after N validations without a better NDCG@10 (0 = never)."),
        dropout: float = typer.Option(None, help="Override the size's dropout."),
        seed: int = typer.Option(0, help="Seed of initialisation, batch order and negative sampling."),
        decoder: str = typer.Option(
            "heads", help="heads (prior-conditioned, the method) or a baseline: comirec (ComiRec-SA), "
            "remi (ComiRec-SA + routing regularisation + hard negatives), dualvae."),
        interests: int = typer.Option(4, help="Baselines: number of interests / aspects K."),
        routing_reg: float = typer.Option(None, help="comirec/remi: routing regularisation λ (remi default 100)."),
        beta: float = typer.Option(0.0, help="Hard-negative weighting β of sampled negatives (REMI; needs --negatives N)."),
        kl_weight: float = typer.Option(0.2, help="dualvae: weight of the KL term (reached after --kl-anneal-steps)."),
        kl_anneal_steps: int = typer.Option(1000, help="dualvae: linear KL annealing steps."),
        contrast_weight: float = typer.Option(0.1, help="dualvae: weight of the contrastive neighbour term."),
        item_llm: str = typer.Option("minilm", help="hllm: item encoder (path or hub name; 'minilm' = bundled, offline)."),
        user_llm: str = typer.Option("tiny", help="hllm: user decoder (path or hub name; 'tiny' = small Llama from scratch)."),
        text_cols: str = typer.Option("title,tags,text", help="hllm: item text fields (columns or attrs keys)."),
        max_text_len: int = typer.Option(256, help="hllm: tokens per item text."),
        item_pooling: str = typer.Option("mean", help="hllm: item embedding by mean pooling or an appended token."),
        train_item_llm: bool = typer.Option(False, "--train-item-llm", help="hllm: fine-tune the item LLM end to end (needs --negatives N; slow without a GPU)."),
        windows: str = typer.Option(None, help="Windows reference (default: the current ones, from the last `mhr windows build`)."),
        name: str = typer.Option(None, help="Run name (default: derived from the parameters)."),
        device: str = typer.Option("cpu", help="cpu, cuda or mps (bf16 autocast on cuda)."),
        checkpoint_every: int = typer.Option(0, help="Also checkpoint every N steps (always at each validation)."),
        resume: str = typer.Option(None, help="Continue the interrupted run RUN from its last checkpoint."),
        force: bool = typer.Option(False, help="Retrain even if a run with the same key exists."),
        deterministic: bool = typer.Option(
            False, "--deterministic", help="One CPU thread and torch's deterministic algorithms: identical runs "
            "give identical weights, and --resume ends where an uninterrupted run does. Without it, CPU runs with "
            "several threads differ in the last bits (parallel gradient sums in varying order); GPU runs are not "
            "guaranteed bit-identical. Recorded in config.json (kept by --resume), not in the run key."),
    ) -> None:
        """Train a backbone with prior-conditioned heads; prints `run:<name>`.

        Example: mhr train --backbone hstu --size 1 --priors item,temporal --compose hierarchical

        Ablations and baselines on the same backbone and loss: --priors random:8 (items in 8 random
        groups), --priors all:8 (8 heads over every item), --decoder comirec --interests 8,
        --decoder remi --interests 8 --negatives 256 --beta 1.
        """
        from mhr.errors import UsageError
        from mhr.train import TrainParams, resume_params, train
        from mhr.workspace import record_current

        c = context(ctx)
        ds = c.dataset()
        if resume:
            params, windows = resume_params(ds, resume)
            name = resume
        else:
            if negatives == "full":
                n_neg = None
            elif negatives.isdigit() and int(negatives) > 0:
                n_neg = int(negatives)
            else:
                raise UsageError(f"--negatives {negatives!r} is neither 'full' nor a positive count")
            params = TrainParams(
                backbone=backbone, size=size, priors=tuple(parse_list(priors)), compose=compose,
                global_head=global_head, score=score, temperature=temperature, negatives=n_neg,
                negatives_from=negatives_from, global_ratio=global_negatives_ratio,
                negatives_per=negatives_per, in_batch_negatives=in_batch_negatives, logq=logq,
                router=router, router_weight=router_weight,
                head_weights=head_weights, gamma=gamma, epochs=epochs, max_steps=max_steps,
                batch_size=batch_size, lr=lr, weight_decay=weight_decay, warmup_steps=warmup_steps,
                clip=clip, eval_every=eval_every, patience=patience, seed=seed, dropout=dropout,
                item_llm=item_llm, user_llm=user_llm, text_cols=tuple(parse_list(text_cols)),
                max_text_len=max_text_len, pooling=item_pooling, decoder=decoder, interests=interests,
                routing_reg=routing_reg, beta=beta, kl_weight=kl_weight, kl_anneal_steps=kl_anneal_steps,
                contrast_weight=contrast_weight, train_item_llm=train_item_llm,
            )
            if train_item_llm and backbone != "hllm":
                raise UsageError("--train-item-llm fine-tunes HLLM's item LLM", hint="add --backbone hllm")
        result = train(ds, params, windows=windows, name=name, device=device, force=force,
                       resume=bool(resume), checkpoint_every=checkpoint_every, deterministic=deterministic)
        if result.cached:
            err.print(f"cached: run {result.name} (key {result.key[:12]})")
        else:
            best = result.best
            err.print(f"trained {result.name}: best valid NDCG@10 {best.get('valid_ndcg@10', float('nan')):.4f} "
                      f"at step {best.get('step')} of {best.get('steps')}")
        record_current(ds, run=result.name)  # `mhr eval` without a run evaluates this one
        emit(f"run:{result.name}")
