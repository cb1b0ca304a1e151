"""Policy-gradient reinforcement learning with fixed and learned policy losses (issue 20's
third family): Gymnasium's CartPole, REINFORCE with a baseline, and a learned policy loss in
ML3's manner searched by CMA-ES on the return of the policies it trains."""
