"""Loadable modules: loading a `.ko` image (its init runs, then its init text is freed),
unloading, and which module an address is in.  A mixin of `SMPMachine`."""

from __future__ import annotations

from dataclasses import dataclass

from . import _memory as mem
from ._events import ModuleGoing
from ._kernel import IMAGES, Image


@dataclass
class Module:
    name: str
    image: Image
    text: tuple[int, int]
    init_text: tuple[int, int]
    data: tuple[int, int]
    init_freed: bool = False
    loaded: bool = True

    def in_text(self, addr: int) -> bool:
        return self.text[0] <= addr < self.text[1]

    def in_init(self, addr: int) -> bool:
        return self.init_text[0] <= addr < self.init_text[1]



class Modules:
    """The module part of `SMPMachine` (see `_machine`)."""

    async def load_module(self, name: str) -> Module:
        if name in self.modules:
            raise ValueError(f"module {name} is already loaded")
        image = Image.load(IMAGES / self.arch / f"{name}.ko", module=name)
        self._load_image(image)
        sec = image.sections
        text = sec.get(".text", (mem.MODULE_TEXT.start, 0))
        init = sec.get(".init.text", (0, 0))
        data = (mem.MODULE_DATA.start, mem.MODULE_DATA.size)
        module = Module(name, image, (text[0], text[0] + text[1]), (init[0], init[0] + init[1]),
                        data)
        self.kallsyms.add(image.symbols)
        self.modules[name] = module
        await self.text_poke_batch([(text[0], self.memory.peek(text[0], text[1]))])
        init_fn = next((s for s in image.symbols if s.is_func and module.in_init(s.addr)
                        and s.name.endswith("_init")), None)
        if init_fn is not None:
            await self.call(init_fn.addr, comm="insmod")
        # Free the init text, as the kernel does after a successful init.
        self.events.publish(ModuleGoing("init_freed", module))
        module.init_freed = True
        if init[1]:
            self.memory.fill(init[0], init[1], 0)
            await self.text_poke_batch([(init[0], bytes(init[1]))])
        return module

    async def unload_module(self, module: Module) -> None:
        if self.modules.get(module.name) is not module:
            raise ValueError(f"module {module.name} is not loaded")
        self.events.publish(ModuleGoing("unload", module))
        del self.modules[module.name]
        module.loaded = False
        self.kallsyms.remove_module(module.name)
        size = module.text[1] - module.text[0]
        await self.text_poke_batch([(module.text[0], bytes(size))])
        self.memory.fill(module.data[0], module.data[1] - module.data[0], 0)

    def module_of(self, addr: int) -> Module | None:
        for m in self.modules.values():
            if m.in_text(addr) or m.in_init(addr):
                return m
        return None

    def _load_image(self, image: Image) -> None:
        for addr, data, memsz in image.segments:
            self.memory.write(addr, data)
            self._code_written(addr, data)
            if memsz > len(data):
                self.memory.fill(addr + len(data), memsz - len(data), 0)

    def _required_symbol(self, name: str) -> int:
        s = self.kallsyms.lookup(name)
        if s is None:
            raise RuntimeError(f"kernel image {self.kernel.path} lacks required symbol {name}")
        return s.addr
