"""The one data plane every transport calls (data_plane.py), and the Open Inference Protocol's tensors (oip.py)."""
