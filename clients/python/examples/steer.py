"""Steer a text towards a meaning: python examples/steer.py --endpoint 127.0.0.1:8000 food=Italian area=riverside"""
import argparse

import dlm

p = argparse.ArgumentParser(description=__doc__)
p.add_argument("targets", nargs="*", help="field=value")
p.add_argument("--endpoint", default="127.0.0.1:8000")
p.add_argument("--n", type=int, default=1)
p.add_argument("--seed", type=int, default=1)
p.add_argument("--stream", action="store_true", help="print the x0 texts as they form")
p.add_argument("--best-of", type=int, help="candidates per text, the best by the model's and guides' log p")
p.add_argument("--guidance-space", choices=["latent", "estimate"], help="default: the server's (latent)")
p.add_argument("--satisfied-prob", type=float, help="a guide stops pulling a text it reads as satisfied")
p.add_argument("--estimate-until", type=int,
               help="in estimate space, edit the latents from this step down (e.g. 150)")
args = p.parse_args()
options = dict(seed=args.seed, best_of=args.best_of, guidance_space=args.guidance_space,
               satisfied_prob=args.satisfied_prob, estimate_until=args.estimate_until)

with dlm.Client(args.endpoint, timeout=120) as client:
    fields = {f.name for g in client.describe().guides for f in g.fields}
    print("fields:", ", ".join(sorted(fields)))
    if args.stream:
        for ev in client.stream(args.n, args.targets, progress_every=50, **options):
            if isinstance(ev, dlm.pb.Progress):
                print(f"[{ev.step:4d} to go]", ev.texts[0])
            else:
                print(*[s.text for s in ev.samples], sep="\n")
    else:
        for text in client.texts(args.n, args.targets, **options):
            print(text)
