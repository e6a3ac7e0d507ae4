def resolve_chat_template(tokenizer, chat_template=None, tools=None, model_config=None, **kwargs):
    return chat_template or getattr(tokenizer, "chat_template", None)
