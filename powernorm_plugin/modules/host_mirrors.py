"""Host-side copies of a layer's device state, so that a training call on a GPU never waits.

Reading a CUDA tensor's value on the host (``int(t)``, ``bool(t)``) waits until the device
has run everything queued before it; one such read per layer and step keeps the host from
running ahead of the device and leaves the device idle between the layers. PowerNorm needs
two values on the host: its step counter (for warm-up) and whether the batch statistic was
finite (to refuse NaN). Both are kept here without a read of the device on the common path.
"""
import torch


class StepCounter:
    """The buffer ``num_steps`` as a host int.

    On the CPU the buffer is read at every call: that costs a fraction of a microsecond and
    sees every write. On a GPU, where a read waits for the device, a host mirror stands in
    for it and follows each training call's increment; the buffer is read again where it
    changed otherwise through torch (a ``load_state_dict``, a ``.to()``, an in-place edit,
    each of which bumps the tensor's version) or was replaced (another tensor, or another
    tensor's contents swapped in by ``torch.utils.swap_tensors``). Writes that torch does not
    version are not seen there: through ``.data``, by another process sharing the memory,
    or DDP's buffer broadcast (``broadcast_buffers=True``; fairseq's default is off).
    The mirror holds the buffer itself, not a weak reference, which ``swap_tensors`` refuses.
    Pickling or deep-copying gives a fresh, unread mirror.
    """

    def __init__(self):
        self._source = self._impl = self._version = None
        self._value = 0

    def __reduce__(self):
        return type(self), ()

    def _current(self, num_steps):
        return (self._source is num_steps and self._impl == num_steps._cdata
                and self._version == num_steps._version)

    @staticmethod
    def _reads_directly(num_steps):
        """Whether reading the buffer costs nothing (no wait for a device)."""
        return num_steps.is_cpu

    def value(self, num_steps):
        """int(num_steps): read on the CPU; on a GPU, read only where the mirror is out of
        date."""
        if self._reads_directly(num_steps) or not self._current(num_steps):
            self._value = int(num_steps)
            self._source, self._impl = num_steps, num_steps._cdata
            self._version = num_steps._version
        return self._value

    def add(self, num_steps, increment=1):
        """num_steps += increment (an int, or a 0-d tensor the host assumes to be 1)."""
        version = num_steps._version
        num_steps.add_(increment)
        self.moved(num_steps, version)

    def moved(self, num_steps, version):
        """Follow what one training call did to the buffer since its ``version``: nothing, or
        one in-place increment (by 1, or by a 0-d tensor the host assumes to be 1)."""
        if self._source is num_steps and self._version == version:
            if num_steps._version == version + 1:
                self._value += 1
                self._version = version + 1

    def forget(self):
        """Read the buffer again next time (after an increment the host could not know)."""
        self._source = None


def defers_checks(x):
    """Whether a training call on ``x`` reports a non-finite batch statistic at the next call
    instead of at once: on CUDA, where testing at once would make the host wait for the
    device."""
    return x.is_cuda


class DeferredFiniteCheck:
    """A 0-d bool on the device, read on the host one call later without waiting.

    For a CUDA flag, :meth:`record` queues a copy into pinned host memory behind the current
    work, with an event after it; :meth:`failed` (called at the start of the next call,
    when the device has long finished that copy) waits on the event and reads the copy.
    A flag on the CPU is simply kept until then.
    """

    def __init__(self):
        self._pinned = self._flag = self._event = self._recorder = None

    def __reduce__(self):
        return type(self), ()

    def record(self, ok):
        if ok.is_cuda:
            if self._pinned is None:
                self._pinned = torch.empty((), dtype=torch.bool, pin_memory=True)
            self._pinned.copy_(ok, non_blocking=True)  # on the current stream of ok's device
            if self._recorder is None or self._recorder[0] != ok.device:
                self._recorder = ok.device, torch.cuda.Event()  # an event is bound to its device
            # (that stream, not the current device's: with the layer on another GPU than the
            # current one, an event there would not follow the copy)
            self._recorder[1].record(torch.cuda.current_stream(ok.device))
            self._event = self._recorder[1]
            self._flag = self._pinned
        else:
            self._flag, self._event = ok, None

    def failed(self):
        """Whether the last recorded flag was False (and forget it)."""
        if self._flag is None:
            return False
        if self._event is not None:
            self._event.synchronize()
            self._event = None
        flag, self._flag = self._flag, None
        return not bool(flag)
