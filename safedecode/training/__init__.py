"""Training-side code: the methods that learn something and what they share.

- :mod:`.teacher` — teacher forcing (one helper for OPO, TA-SFT, SafeInfer's head effects and the
  evaluation's perplexity);
- :mod:`.ta_sft` — TA-SFT data and fine-tuning on transformers' Trainer (LoRA or full), with
  the fused linear CE / semantic-EMD loss of :mod:`safedecode.ops.linear_emd`;
- :mod:`.opo` — ACD's Opposite Prompt Optimization (soft prompts);
- :mod:`.save` — writing adapters as safedecode ships them.
"""
