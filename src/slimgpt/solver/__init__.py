"""Pure-tensor maths of SlimGPT: Hessians, OBS column removal, head scores, group sizes, ratio schedules.

These modules import only torch (and the project's errors). Paper notation is used: W is a weight
(d_out x d_in), H = 2 X X^T / N the Hessian of the layer-wise squared error in W's inputs, Hinv its inverse.
"""
