"""One huge output: refused with a clear note, and the kernel and link live on."""

from __future__ import annotations

from conftest import start_server


def _config(text: str) -> str:
    from conftest import config_file

    return config_file(text)


def test_an_output_over_the_frame_limit_becomes_a_note_and_nothing_breaks():
    server = start_server("--pool-size", "1", "--config", _config("max_frame_size = 1048576"))
    try:
        with server.client() as client:
            model = client.create_kernel()
            other = client.create_kernel()
            with client.connect(model.id) as k:
                big = k.execute("print('x' * 3_000_000)", timeout=60)
                assert "x" * 1000 not in big.stdout
                assert "was not sent" in big.stderr and "1048576" in big.stderr
                html = k.execute(
                    "from IPython.display import HTML, display\ndisplay(HTML('y' * 3_000_000))",
                    timeout=60,
                )
                assert html.displays == []
                assert "display_data" in html.stderr
                # the same kernel, over the same link, goes on normally
                assert k.execute("print('fine'); 6 * 7").result_text == "42"
            with client.connect(other.id) as o:
                assert o.execute("'neighbour ok'").result_text == "'neighbour ok'"
    finally:
        server.stop()
