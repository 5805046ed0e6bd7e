"""The GPU suite, `python -m programs.bench --suite gpu` (`suite.run_gpu_suite`): kernel correctness
on CUDA and the Llama-3.2-1B-shaped training benchmark.

One script a GPU session runs in under 8 minutes with nothing but the repo and the image's
torch / transformers / triton (flash-attn and peft used when installed, skipped otherwise; nothing
is downloaded). Sections, each timed against a budget and recorded as skipped or failed (with the
error) rather than ending the run:

  environment  versions, device name, triton / flash-attn / peft availability
  kernels      every dispatched kernel, and every Triton kernel (RMSNorm, SwiGLU, LoRA linear with
               and without bias and dropout, the fused linear + cross-entropy head frozen and
               trained, whole-vocabulary and vocabulary-tiled), forward and backward vs its
               plain-torch reference on random inputs at several shapes (`cases`), float32
               (relative error <= 1e-5) and bfloat16 (<= 1e-2) (`checks`)
  kernel_timings  forward+backward time of every formulation of each kernel (the torch ones and
               Triton) at the 1B model's shapes in bf16: the numbers a CUDA dispatch rests on (`timing`)
  attention    every attention formulation for the device (masked SDPA, SDPA per document, torch's
               varlen flash kernel, flash-attn varlen when installed) vs `sdpa_attention` with the
               segment mask on packed rows, forward and backward (autograd and torch.func), and each
               one's time at the benchmark's shapes; a dispatched one that fails is not benchmarked
  peak         the measured bf16 matmul peak (an 8192^3 matmul), and the datasheet peak if known
  benchmark    a Llama-3.2-1B-shaped random model in bf16, one packed row of 2048 tokens:
               our LoRA step (r=16, all linear layers), HF transformers + PEFT LoRA on the same
               weights and batch (manual loop, torch.optim.AdamW), our full fine-tune and HF's
               (`benchmark`)

MFU = model FLOPs per step / step time / peak FLOP/s, with the model FLOPs of `backends.flops`
(PaLM appendix B, attention within documents, frozen weights without weight gradients):

    F = 4 N_frozen T + 6 N_trained T + 12 n_layers d_attn P + c_head V E S

(P = sum over documents of L(L+1)/2 causal pairs, S = supervised tokens, c_head 4 frozen / 6
trained). `mfu_6n` is the convention many trainers print, (6 (N_matmul + V E) T + 12 n_layers
d_attn P) / time / peak, which credits a LoRA step with base-weight gradients it never computes.
Our step runs the kernels `programs.sft` trains with (`kernels.select_model_ops`), listed with
each result.

Every piece takes a `device`, so the CPU tests run the whole suite on a tiny model.
"""
