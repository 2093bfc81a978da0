"""One model version's request path: payloads -> preprocess (decode budgets) -> batches -> backend ->
predictions; ReadDigits; the digit score."""
