"""A direct float64 transcription of PowerNorm's equations (the brief's Algorithm 2), used as
the test oracle. Written for clarity, not speed, and independent of the module's code."""
import torch


def group_scale(X, groups, eps):
    if groups is None:
        return X
    N, C = X.shape
    Xg = X.view(N, groups, C // groups)
    return (Xg / torch.sqrt((Xg ** 2).mean(-1, keepdim=True) + eps)).view(N, C)


def powernorm_step(x, pad, dy, gamma, beta, state, mode, warmup, af, ab, eps, groups,
                   causal=False):
    """One training step. state = dict(phi, nu, step). Returns (y, dx, dgamma, dbeta, new_state).

    causal: the output never depends on the current batch, so warm-up normalizes by psi_{t-1}
    as well (the statistics move as without it)."""
    T, B, C = x.shape
    X = x.reshape(T * B, C).detach().clone().requires_grad_(True)
    DY = dy.reshape(T * B, C)
    tok = ~pad.t().reshape(-1) if pad is not None else torch.ones(T * B, dtype=torch.bool)
    z = group_scale(X, groups, eps)
    zd = z.detach()
    phi, nu, step = state["phi"], state["nu"], state["step"] + 1
    psiB = (zd[tok] ** 2).mean(0)
    warm = step <= warmup
    if warm:
        phi_new = phi * (step - 1) / step + psiB / step
        if mode == "official":
            phi_new = af * phi_new + (1 - af) * psiB
    else:
        phi_new = af * phi + (1 - af) * psiB
    nu_new = nu
    g = gamma * DY
    if mode == "vanilla":
        zz = zd.clone().requires_grad_(True)
        yv = gamma * zz / torch.sqrt((zz[tok] ** 2).mean(0) + eps) + beta
        (dz,) = torch.autograd.grad(yv, zz, DY)
        s = psiB
    else:
        s = psiB if warm and not causal else phi
        zhat = zd / torch.sqrt(s + eps)
        if mode == "paper":
            corr = torch.where(tok[:, None], nu * zhat, torch.zeros_like(zhat))
            dz = (g - corr) / torch.sqrt(s + eps)
            Gamma = (zhat[tok] ** 2).mean(0)
            Lambda = (g[tok] * zhat[tok]).mean(0)
        else:
            dz = (g - nu * zhat) / torch.sqrt(psiB + eps)
            Gamma = (zhat ** 2).mean(0)
            Lambda = (g * zhat).mean(0)
        nu_new = nu * (1 - (1 - ab) * Gamma) + (1 - ab) * Lambda
    zhat = zd / torch.sqrt(s + eps)
    y = gamma * zhat + beta
    (dX,) = torch.autograd.grad(z, X, dz) if groups is not None else (dz,)
    dgamma = (DY * zhat).sum(0)
    dbeta = DY.sum(0)
    new_state = {"phi": phi_new, "nu": nu_new, "step": step}
    return y.view(T, B, C), dX.view(T, B, C), dgamma, dbeta, new_state
