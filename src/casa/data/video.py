"""A sample video to caption: the synthetic `video` task written as a file.

Design decisions:
- The frames are the `video` task's (`casa.data.tasks.video`: a shape
  stepping across a 3 x 3 grid), so a model trained on that task, as
  `casa demo`'s is, captions them in the words it learned ("green triangle
  left"), and the returned reference captions say what a right answer is.
- Written with PyAV (MPEG-4 part 2, yuv420p), atomically: an interrupted write
  leaves no half file at the destination.
"""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path

__all__ = ["write_sample_video"]


def write_sample_video(path, *, frames: int = 8, fps: float = 2.0, size: int = 128, seed: int = 0) -> list[str]:
    """Write `frames` frames of the `video` task (seed `seed`) to `path` at `fps`; `size` x `size` pixels
    (even). Returns the reference caption of each frame, in order."""
    import av
    import numpy as np

    from casa.data.tasks import difficulty, make_sample
    from casa.files import VIDEO_CONTAINERS, atomic_file

    path = Path(path)
    if path.suffix.lower() not in VIDEO_CONTAINERS:
        raise ValueError(f"{path}: a sample video is written as {', '.join(VIDEO_CONTAINERS)}")
    sample = make_sample("video", seed, 0, difficulty({"frames": frames, "image_size": size}))
    images = [part["image"] for m in sample.messages if m["role"] == "user" for part in m["content"]
              if part["type"] == "image"]
    captions = [part["text"] for m in sample.messages if m["role"] == "assistant" for part in m["content"]]
    with atomic_file(path, "wb") as f:
        container = av.open(f, "w", format=VIDEO_CONTAINERS[path.suffix.lower()])
        stream = container.add_stream("mpeg4", rate=Fraction(fps).limit_denominator(1000))
        stream.width = stream.height = size
        stream.pix_fmt, stream.bit_rate = "yuv420p", 2_000_000
        for image in images:
            frame = av.VideoFrame.from_ndarray(np.asarray(image.convert("RGB")), format="rgb24")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
        container.close()
    return captions
