"""Training-side helpers shared by the methods that learn something (OPO, SafeInfer's vector and
unsafe adapter, reward models) and by the evaluation's perplexity."""
