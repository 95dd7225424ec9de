"""Copying a GGUF with some metadata changed or added (to build broken pairs, or a templated model)."""


def copy_gguf_with(src, dst, added: dict[str, str] | None = None, **changes):
    """Copy a GGUF's metadata and tensors, replacing some scalar values (`changes`) and adding
    string keys (`added`)."""
    import gguf

    reader = gguf.GGUFReader(src)
    writer = gguf.GGUFWriter(dst, reader.fields["general.architecture"].contents())
    for field in reader.fields.values():
        if field.name == "general.architecture" or field.name.startswith("GGUF."):
            continue
        sub = field.types[-1] if field.types[0] == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(field.name, changes.get(field.name, field.contents()), field.types[0], sub_type=sub)
    for key, value in (added or {}).items():
        writer.add_key_value(key, value, gguf.GGUFValueType.STRING)
    for t in reader.tensors:
        writer.add_tensor_info(t.name, t.data.shape, t.data.dtype, t.data.nbytes, t.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for t in reader.tensors:
        writer.write_tensor_data(t.data)
    writer.close()
    return dst
