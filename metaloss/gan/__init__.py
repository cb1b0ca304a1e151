"""GAN losses, fixed and learned, on a 2-D mixture of Gaussians (issue 20's second family): a
two-player inner loop with one optimizer per player, mode coverage and the Fréchet distance as
the measures, and a learned loss searched by CMA-ES on them."""
