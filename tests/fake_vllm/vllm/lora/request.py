class LoRARequest:
    def __init__(self, name, request_id, path):
        self.name, self.request_id, self.path = name, request_id, path
