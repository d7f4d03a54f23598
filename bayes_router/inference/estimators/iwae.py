"""The importance-weighted bound and its standard gradient (``RenyiELBO`` with ``alpha = 0``).

Paper: Burda, Grosse, Salakhutdinov (2016), *Importance Weighted Autoencoders*. **Biased** as
an estimate of the ELBO gradient (it targets the tighter importance-weighted bound).
"""

from __future__ import annotations

from pyro.infer import RenyiELBO

from bayes_router.inference.estimators.base import Estimator


class IWAE(Estimator):
    """Gradient of the ``N``-particle importance-weighted bound ``E[log mean_k w_k]``.

    ``w_k = p(x, z_k) / q(z_k)`` with ``z_k`` drawn by ``torch``'s implicitly reparameterised
    Dirichlet sampler; :class:`~pyro.infer.RenyiELBO` with ``alpha = 0`` differentiates
    ``log mean_k w_k`` (self-normalised weights times the total derivative of each
    ``log w_k``). The log-weights are formed per element of the plates every site shares, as
    ``RenyiELBO`` does. Needs ``num_particles >= 2`` (one particle is the ELBO itself).

    .. warning:: The estimator is unbiased for the gradient of the importance-weighted bound,
        which is tighter than the ELBO, so it is **biased** as an estimator of the ELBO
        gradient; the bias shrinks as the guide approaches the posterior. Its signal-to-noise
        ratio for the guide parameters also falls as ``num_particles`` grows [2]: see ``dreg``.

    References

    [1] `Importance Weighted Autoencoders`, Yuri Burda, Roger Grosse, Ruslan Salakhutdinov
        (ICLR 2016)

    [2] `Tighter Variational Bounds are Not Necessarily Better`, Tom Rainforth, Adam R.
        Kosiorek, Tuan Anh Le, Chris J. Maddison, Maximilian Igl, Frank Wood, Yee Whye Teh
        (ICML 2018)
    """

    name = "iwae"
    unbiased = False
    reference = ("Burda, Grosse, Salakhutdinov (2016), Importance Weighted Autoencoders")
    min_particles = 2

    def make_elbo(self, num_particles: int = 2, vectorize_particles: bool = True,
                  **kwargs) -> RenyiELBO:
        return RenyiELBO(alpha=0, num_particles=self.check_num_particles(num_particles),
                         vectorize_particles=vectorize_particles, **kwargs)
