"""The network inner product is invariant under every weight-space symmetry
generator.

Claim: with G_0 = I and
    G_{l+1} = Da [1/2 ((La G Lb^T) * (Ra G Rb^T) + (La G Rb^T) * (Ra G Lb^T))] Db^T,
the final G of two 2-layer stacks (padded factors) is unchanged when a's
weights undergo (i) a permutation of hidden units, (ii) the L/R swap,
(iii) per-unit rescaling L_h -> s L_h, R_h -> t R_h, D_:h -> D_:h / (s t),
(iv) an affine change of basis M~ = [[1, 0], [c, M]] of the wire between the
layers (D1 -> M~ D1, L2 -> L2 M~^-1, R2 -> R2 M~^-1).

Proof: symbolic weights (padded width 2, two hidden units plus the constant
unit), the recursion written out in sympy, each generator applied
symbolically, and every entry of the difference simplified to zero.
"""

import sympy

w, h = 2, 3  # padded widths of every wire; hidden units (unit 0 is the constant 1*1)


def mat(name, rows, cols):
    return sympy.Matrix(rows, cols, lambda i, j: sympy.Symbol(f"{name}{i}{j}"))


def stack(name):
    """Two padded bilinear layers; row 0 of D keeps the constant channel."""
    layers = []
    for k in (1, 2):
        L, R, D = mat(f"{name}L{k}_", h, w), mat(f"{name}R{k}_", h, w), mat(f"{name}D{k}_", w, h)
        L[0, :] = R[0, :] = sympy.Matrix([[1, 0]])  # constant unit computes 1 * 1
        D[0, :] = sympy.Matrix([[1] + [0] * (h - 1)])  # output channel 0 stays 1
        layers.append((L, R, D))
    return layers


def gram(a, b):
    G = sympy.eye(w)
    for (La, Ra, Da), (Lb, Rb, Db) in zip(a, b):
        core = ((La * G * Lb.T).multiply_elementwise(Ra * G * Rb.T)
                + (La * G * Rb.T).multiply_elementwise(Ra * G * Lb.T)) / 2
        G = Da * core * Db.T
    return G


def same(G1, G2):
    return all(sympy.simplify(e) == 0 for e in (G1 - G2))


a, b = stack("a"), stack("b")
G = gram(a, b)


def test_hidden_permutation():
    (L, R, D), second = a
    perm = [0, 2, 1]
    P = sympy.Matrix(h, h, lambda i, j: 1 if perm[i] == j else 0)
    assert same(gram([(P * L, P * R, D * P.T), second], b), G)


def test_left_right_swap():
    first, (L, R, D) = a
    assert same(gram([first, (R, L, D)], b), G)


def test_rescaling():
    (L, R, D), second = a
    s, t = sympy.symbols("s t", nonzero=True)
    S = sympy.diag(1, s, 1)
    T = sympy.diag(1, t, 1)
    assert same(gram([(S * L, T * R, D * (S * T).inv()), second], b), G)


def test_affine_change_of_basis_between_layers():
    (L1, R1, D1), (L2, R2, D2) = a
    c, m = sympy.symbols("c m", nonzero=True)
    M = sympy.Matrix([[1, 0], [c, m]])  # keeps the constant channel, shifts and scales the wire
    Mi = M.inv()
    assert same(gram([(L1, R1, M * D1), (L2 * Mi, R2 * Mi, D2)], b), G)
