"""Inference on the marginal: NUTS, ML/REML, MAP and VI."""
