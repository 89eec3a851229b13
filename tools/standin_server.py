"""A stand-in for the parts of the Ollama and OpenAI HTTP APIs that `deepseq_nb.backends` uses.

Tests and benchmarks/llm_calls.py only: it lets the real `ollama` and `openai` clients run over loopback with scripted
answers. It never feeds a figure. Routes: Ollama `GET /api/tags`, `POST /api/chat`; OpenAI `POST /v1/chat/completions`,
`POST /v1/responses`. Every request is recorded (path, headers, JSON body) so tests can check what reached it.
"""
from __future__ import annotations
import json, re, threading, time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable


@dataclass
class Reply:
    "One scripted HTTP reply: a status, a JSON body (or raw text), extra headers and a delay before answering."
    status: int = 200
    body: dict|str|None = None
    headers: dict = field(default_factory=dict)
    delay: float = 0.0


def numbered_rows(prompt:str)->list[str]:
    "The comma-separated marker rows (`1. A, B, C`) of a prompt, in order."
    return [m.group(2) for m in re.finditer(r'^\s*(\d+)\.\s+(.+)$', prompt, flags=re.M) if ',' in m.group(2)]


def label_by_first_marker(table:dict[str,str], default='Unknown cell')->Callable[[str],str]:
    "An answer function: one numbered line per marker row, labelled from the row's first marker."
    def answer(prompt:str)->str:
        rows = numbered_rows(prompt)
        if not rows:   # a per-cluster prompt: answer the label of the first known marker, unnumbered
            hits = sorted((prompt.find(g), l) for g, l in table.items() if re.search(rf'\b{re.escape(g)}\b', prompt))
            return hits[0][1] if hits else default
        return '\n'.join(f"{i}. {table.get(r.split(',')[0].strip(), default)}" for i, r in enumerate(rows, 1))
    return answer


def last_user_text(body:dict)->str:
    "The text of the last user message of an Ollama/OpenAI chat body, or the Responses `input`."
    if 'input' in body:
        inp = body['input']
        if isinstance(inp, str): return inp
        msgs = [m for m in inp if m.get('role') == 'user']
        c = msgs[-1]['content'] if msgs else ''
        return c if isinstance(c, str) else ' '.join(p.get('text', '') for p in c)
    msgs = [m for m in body.get('messages', []) if m.get('role') == 'user']
    return msgs[-1].get('content', '') if msgs else ''


def ollama_chat(content:str='', tool_calls:list|None=None, prompt_tokens=11, eval_tokens=7, model='m')->dict:
    "An Ollama `/api/chat` (non-streamed) response body."
    msg = {'role': 'assistant', 'content': content}
    if tool_calls: msg['tool_calls'] = [{'function': {'name': n, 'arguments': a}} for n, a in tool_calls]
    return {'model': model, 'created_at': '2025-01-01T00:00:00Z', 'message': msg, 'done': True, 'done_reason': 'stop',
            'prompt_eval_count': prompt_tokens, 'eval_count': eval_tokens, 'total_duration': 1}


def openai_chat(content:str, prompt_tokens=13, completion_tokens=5, model='m')->dict:
    "An OpenAI `/v1/chat/completions` response body."
    return {'id': 'chatcmpl-1', 'object': 'chat.completion', 'created': 0, 'model': model,
            'choices': [{'index': 0, 'finish_reason': 'stop', 'message': {'role': 'assistant', 'content': content}}],
            'usage': {'prompt_tokens': prompt_tokens, 'completion_tokens': completion_tokens,
                      'total_tokens': prompt_tokens + completion_tokens}}


def openai_response(text:str, citations:list[tuple[str,str]]=(), searches:list[str]=(), input_tokens=17,
                    output_tokens=9, model='m')->dict:
    "An OpenAI `/v1/responses` body: `web_search_call` items for `searches`, then a message citing `citations`."
    items = [{'type': 'web_search_call', 'id': f'ws_{i}', 'status': 'completed',
              'action': {'type': 'search', 'query': q}} for i, q in enumerate(searches)]
    ann = [{'type': 'url_citation', 'url': u, 'title': t, 'start_index': 0, 'end_index': len(text)}
           for u, t in citations]
    items.append({'type': 'message', 'id': 'msg_1', 'role': 'assistant', 'status': 'completed',
                  'content': [{'type': 'output_text', 'text': text, 'annotations': ann}]})
    return {'id': 'resp_1', 'object': 'response', 'created_at': 0, 'model': model, 'status': 'completed',
            'output': items, 'parallel_tool_calls': True, 'tool_choice': 'auto', 'tools': [],
            'usage': {'input_tokens': input_tokens, 'output_tokens': output_tokens,
                      'total_tokens': input_tokens + output_tokens,
                      'input_tokens_details': {'cached_tokens': 0}, 'output_tokens_details': {'reasoning_tokens': 0}}}


class StandinServer:
    "A threaded loopback HTTP server; `script(path, body)` returns a `Reply` (or a queue of them is consumed first)."
    def __init__(self, models=('llama3.2:1b',), latency:float=0.0, max_requests:int=5000):
        self.models, self.latency, self.max_requests = list(models), latency, max_requests
        self.requests: list[dict] = []
        self.queue: list[Reply] = []
        self.script: Callable[[str, dict], Reply]|None = None
        self._lock = threading.Lock()
        self.httpd = ThreadingHTTPServer(('127.0.0.1', 0), self._handler())
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={'poll_interval': 0.05}, daemon=True)

    @property
    def url(self)->str: return f'http://127.0.0.1:{self.httpd.server_address[1]}'

    def start(self):
        self.thread.start(); return self

    def stop(self):
        self.httpd.shutdown(); self.httpd.server_close(); self.thread.join(timeout=5)

    def __enter__(self): return self.start()
    def __exit__(self, *a): self.stop()

    def calls(self, path:str|None=None)->list[dict]:
        "Recorded requests, optionally only those to `path`."
        with self._lock: return [r for r in self.requests if path is None or r['path'] == path]

    def reset(self):
        with self._lock: self.requests.clear(); self.queue.clear()

    def _reply(self, path:str, body:dict)->Reply:
        with self._lock:
            if len(self.requests) > self.max_requests: return Reply(410, {'error': 'stand-in request budget spent'})
            if self.queue: return self.queue.pop(0)
        if path == '/api/tags':
            return Reply(200, {'models': [{'model': m, 'name': m, 'size': 1, 'digest': 'x'} for m in self.models]})
        if self.script is None: return Reply(500, {'error': 'no script for this test'})
        return self.script(path, body)

    def _handler(self):
        srv = self
        class H(BaseHTTPRequestHandler):
            def log_message(self, *a): pass
            def _serve(self):
                n = int(self.headers.get('Content-Length') or 0)
                raw = self.rfile.read(n) if n else b''
                try: body = json.loads(raw) if raw else {}
                except json.JSONDecodeError: body = {'_raw': raw.decode(errors='replace')}
                path = self.path.split('?')[0]
                headers = {k.lower(): v for k, v in self.headers.items()}
                with srv._lock:
                    srv.requests.append({'path': path, 'method': self.command, 'headers': headers,
                                         'body': body, 't': time.monotonic()})
                r = srv._reply(path, body)
                time.sleep(srv.latency + r.delay)
                data = (r.body if isinstance(r.body, str) else json.dumps(r.body or {})).encode()
                try:
                    self.send_response(r.status)
                    self.send_header('Content-Type', 'application/json')
                    self.send_header('Content-Length', str(len(data)))
                    for k, v in r.headers.items(): self.send_header(k, str(v))
                    self.end_headers(); self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError): pass
            do_GET = do_POST = _serve
        return H
