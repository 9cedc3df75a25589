"""The package imports and trains when llkern._C is missing; the ops say how to build."""

import subprocess
import sys
import textwrap


def test_works_without_compiled_extension():
    script = textwrap.dedent("""
        import sys, warnings
        sys.modules["llkern._C"] = None   # makes `from llkern import _C` raise ImportError
        import torch, llkern
        assert not llkern.extension_loaded()
        assert not llkern.kernel_available("transport_penalty", "cpu")
        y, x = torch.randn(4, 5), torch.randn(4, 5)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            loss = llkern.transport_penalty(y, x, tau=0.5)
        assert any("pure-PyTorch reference" in str(w.message) and "pip install" in str(w.message)
                   for w in caught), [str(w.message) for w in caught]
        expected = ((y - x) ** 2).mean() / (2 * 0.5)
        assert torch.allclose(loss, expected), (loss, expected)
        try:
            llkern.transport_penalty(y, x, impl="kernel")
        except RuntimeError as error:
            assert "pip install" in str(error) and "failed to import" in str(error), error
        else:
            raise AssertionError("impl='kernel' without llkern._C must raise")
        from llkern.models import digits_resnet
        net = llkern.LocalNet(digits_resnet(2, width=4), num_classes=10,
                              losses=llkern.TransportRegularized(), example_input=torch.randn(2, 1, 8, 8))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            result = net.local_step(torch.randn(8, 1, 8, 8), torch.randint(0, 10, (8,)))
        assert len(result.losses) == 2 and all(t["transport"] > 0 for t in result.terms)
        print("ok")
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().endswith("ok")
