"""What users would otherwise run on a GPU: Hugging Face transformers + PEFT LoRA training on the same
~1.1B Llama shape, batch and sequence length as cuda/bench-train.ts, for the issue's ">= 1.5x the tokens/s
of transformers + PEFT" target. Run by scripts/gpu-check.sh on a GPU machine; prints one JSON object.

Usage: python3 bench/peft_baseline.py [--layers 22] [--batch 4] [--seq 512] [--budget-s 90] [--device cuda]

The model is built from a LlamaConfig with random weights (nothing is downloaded): hidden 2048, 22 layers,
32/4 heads (head_dim 64), intermediate 5632, vocab 32000 — TinyLlama-1.1B's shapes. LoRA r=16, alpha=16,
dropout 0 on all seven linear targets, gradient checkpointing (non-reentrant), SDPA attention, labels =
inputs (every token counts), one optimizer step per micro-batch.
- With bitsandbytes importable: the QLoRA recipe (4-bit NF4 base with double quantization, bf16 compute,
  paged_adamw_8bit) — the like-for-like comparison.
- Without it (the GPU image this project is checked on has no bitsandbytes): a bf16 base with PEFT LoRA and
  torch AdamW. The report says which (`recipe`); a bf16 base does no dequantization, so it is the harder
  baseline for speed and the easier one for memory.
Timing: two warm-up steps, then steps until --budget-s or --max-steps, synchronized before each clock read.
"""
import argparse, json, os, sys, time, traceback

ap = argparse.ArgumentParser()
ap.add_argument('--layers', type=int, default=22)
ap.add_argument('--batch', type=int, default=4)
ap.add_argument('--seq', type=int, default=512)
ap.add_argument('--budget-s', type=float, default=90.0)
ap.add_argument('--max-steps', type=int, default=50)
ap.add_argument('--device', default='cuda')
ap.add_argument('--hidden', type=int, default=2048)
ap.add_argument('--intermediate', type=int, default=5632)
ap.add_argument('--vocab', type=int, default=32000)
ap.add_argument('--heads', type=int, default=32)
ap.add_argument('--kv-heads', type=int, default=4)
args = ap.parse_args()

report = {'benchmark': 'peft-lora-train', 'layers': args.layers, 'batch': args.batch, 'seqLen': args.seq}


def finish(code=0):
    print(json.dumps(report))
    sys.exit(code)


try:
    import torch
    import transformers
    import peft
    from transformers import LlamaConfig, LlamaForCausalLM
    from peft import LoraConfig, get_peft_model
    report['versions'] = {'torch': torch.__version__, 'transformers': transformers.__version__, 'peft': peft.__version__}
    try:
        import bitsandbytes  # noqa: F401
        have_bnb = True
        report['versions']['bitsandbytes'] = bitsandbytes.__version__
    except Exception:
        have_bnb = False
    dev = torch.device(args.device)
    if dev.type == 'cuda':
        if not torch.cuda.is_available():
            report['error'] = 'torch sees no CUDA device'
            finish(1)
        report['device'] = torch.cuda.get_device_name(dev)
    cfg = LlamaConfig(
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
        num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
        max_position_embeddings=max(4096, args.seq), rms_norm_eps=1e-5, tie_word_embeddings=False, use_cache=False,
    )
    cfg._attn_implementation = 'sdpa'
    dtype = torch.bfloat16 if dev.type == 'cuda' else torch.float32
    torch.manual_seed(0)
    t0 = time.perf_counter()
    if have_bnb and dev.type == 'cuda':
        # QLoRA: save the random bf16 model once, reload it 4-bit (what from_pretrained does for users)
        import tempfile
        from transformers import BitsAndBytesConfig
        tmp = tempfile.mkdtemp(prefix='peft-baseline-')
        with torch.device('cuda'):
            LlamaForCausalLM(cfg).to(torch.bfloat16).save_pretrained(tmp)
        torch.cuda.empty_cache()
        q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type='nf4', bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=torch.bfloat16)
        model = LlamaForCausalLM.from_pretrained(tmp, quantization_config=q, device_map={'': dev.index or 0})
        from peft import prepare_model_for_kbit_training
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True,
                                                gradient_checkpointing_kwargs={'use_reentrant': False})
        report['recipe'] = 'qlora: nf4 + double quant base (bitsandbytes), bf16 compute, LoRA, paged_adamw_8bit'
    else:
        with dev:
            model = LlamaForCausalLM(cfg).to(dtype)  # fp32 init on the device, then bf16 (transient 4.4 GB)
        if dev.type == 'cuda':
            torch.cuda.empty_cache()
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={'use_reentrant': False})
        report['recipe'] = f'lora on a {str(dtype).replace("torch.", "")} base (bitsandbytes not installed), torch AdamW'
    model.config.use_cache = False
    lcfg = LoraConfig(r=16, lora_alpha=16, lora_dropout=0.0, bias='none', task_type='CAUSAL_LM',
                      target_modules=['q_proj', 'k_proj', 'v_proj', 'o_proj', 'gate_proj', 'up_proj', 'down_proj'])
    model = get_peft_model(model, lcfg)
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    report['trainableParameters'] = sum(p.numel() for p in trainable)
    report['parameters'] = sum(p.numel() for p in model.parameters())
    if have_bnb and dev.type == 'cuda':
        import bitsandbytes as bnb
        opt = bnb.optim.PagedAdamW8bit(trainable, lr=1e-4)
    else:
        opt = torch.optim.AdamW(trainable, lr=1e-4, fused=dev.type == 'cuda')
    report['setupSeconds'] = time.perf_counter() - t0
    g = torch.Generator(device='cpu').manual_seed(1)
    ids = torch.randint(0, args.vocab, (args.batch, args.seq), generator=g).to(dev)

    def sync():
        if dev.type == 'cuda':
            torch.cuda.synchronize(dev)

    def step():
        out = model(input_ids=ids, labels=ids)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return out.loss.detach()

    losses = [float(step()) for _ in range(2)]  # warm-up: allocator, kernels, autotuning
    sync()
    if dev.type == 'cuda':
        torch.cuda.reset_peak_memory_stats(dev)
    t1 = time.perf_counter()
    n = 0
    while n < args.max_steps and time.perf_counter() - t1 < args.budget_s:
        losses.append(float(step()))  # float() synchronizes: the step is complete
        n += 1
    sync()
    dt = time.perf_counter() - t1
    report['steps'] = n
    report['seconds'] = dt
    report['tokensPerSecond'] = args.batch * args.seq * n / dt
    report['losses'] = losses
    if dev.type == 'cuda':
        report['peakDeviceBytes'] = torch.cuda.max_memory_allocated(dev)
    finish(0)
except SystemExit:
    raise
except Exception as e:  # recorded, not fatal: the GPU check's other figures still count
    report['error'] = f'{type(e).__name__}: {e}'
    report['trace'] = traceback.format_exc().splitlines()[-8:]
    finish(1)
