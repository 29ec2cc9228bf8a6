"""`pki` subcommands: make the CA, the SuperLink certificate and the hospitals' node keys.

``main(argv)`` is meant to be mounted under ``medgen-server pki ...``; it returns a
process exit code and prints the Flower flags each file is for.
"""

from __future__ import annotations

import argparse
import sys

from cryptography.x509.verification import VerificationError

from medgen.deploy import pki


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="medgen-server pki",
                                     description="Certificates and SuperNode keys (Flower 1.42).")
    sub = parser.add_subparsers(dest="command", required=True)

    ca = sub.add_parser("ca", help="create the federation CA (ca.crt, ca.key)")
    ca.add_argument("--out", required=True, help="folder for ca.crt and ca.key")
    ca.add_argument("--cn", default="medgen federation CA", help="CA common name")
    ca.add_argument("--days", type=int, default=pki.CA_VALID_DAYS)
    ca.add_argument("--force", action="store_true", help="overwrite existing files")

    server = sub.add_parser("server-cert", help="create the SuperLink TLS certificate")
    server.add_argument("--ca", required=True, help="folder holding ca.crt and ca.key")
    server.add_argument("--out", required=True, help="folder for server.crt and server.key")
    server.add_argument("--host", action="append", default=None,
                        help="DNS name or IP SuperNodes dial (repeat); "
                             f"default: {' '.join(pki.DEFAULT_HOSTS)}")
    server.add_argument("--days", type=int, default=pki.SERVER_VALID_DAYS)
    server.add_argument("--force", action="store_true", help="overwrite existing files")

    node = sub.add_parser("node-key", help="create a hospital's SuperNode auth key pair")
    node.add_argument("--out", required=True, help="folder for NAME and NAME.pub")
    node.add_argument("--name", required=True, help="hospital name, e.g. site-a")
    node.add_argument("--force", action="store_true", help="overwrite existing files")

    verify = sub.add_parser("verify", help="check a server certificate against the CA")
    verify.add_argument("--ca-cert", required=True, help="path to ca.crt")
    verify.add_argument("--cert", required=True, help="path to server.crt")
    verify.add_argument("--host", required=True, help="name or IP the client dials")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "ca":
            pair = pki.create_ca(args.out, args.cn, valid_days=args.days, force=args.force)
            print(f"CA certificate: {pair.cert}  (SuperLink --ssl-ca-certfile, "
                  "SuperNode --root-certificates)")
            print(f"CA private key: {pair.key}  (keep offline; mode 0600)")
        elif args.command == "server-cert":
            hosts = args.host or list(pki.DEFAULT_HOSTS)
            pair = pki.create_server_cert(args.ca, args.out, hosts, valid_days=args.days,
                                          force=args.force)
            print(f"server certificate: {pair.cert}  (SuperLink --ssl-certfile); "
                  f"hosts: {', '.join(hosts)}")
            print(f"server private key: {pair.key}  (SuperLink --ssl-keyfile; mode 0600)")
        elif args.command == "node-key":
            pair = pki.create_node_key(args.out, args.name, force=args.force)
            print(f"node private key: {pair.private_key}  (at the hospital: flower-supernode "
                  "--auth-supernode-private-key)")
            print(f"node public key: {pair.public_key}  (at the coordinator: flwr supernode "
                  "register)")
        else:
            chain = pki.verify_chain(args.cert, args.ca_cert, args.host)
            print(f"OK: {args.cert} verifies for {args.host} ({len(chain)} certificates)")
    except (FileExistsError, FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except VerificationError as err:
        print(f"error: {args.cert} does not verify for {args.host}: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
