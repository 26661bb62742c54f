"""Models: the text encoder, fusion, adaptor, CTR backbones, training and the evaluations."""
