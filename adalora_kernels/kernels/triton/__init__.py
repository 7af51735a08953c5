def unavailable_reason(device):
    return "not built yet"
