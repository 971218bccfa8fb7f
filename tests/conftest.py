import json
import logging
import os
import urllib.request

import pytest
import torch

# Without a GPU the Triton kernels run in Triton's interpreter, which must be chosen before
# triton's first import.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


# ---- a real S3 server (moto) on 127.0.0.1, for the tests of stores on object storage --------------

S3_BUCKET = "dhkd"


def _post(url: str, body: bytes):
    request = urllib.request.Request(url, data=body, method="POST", headers={"Content-Type": "text/plain"})
    with urllib.request.urlopen(request, timeout=10) as response:
        response.read()


@pytest.fixture(scope="session")
def s3():
    """A moto S3 server on 127.0.0.1 for the session (moto's state is per process, so one server
    serves every module), authentication on: an IAM user with an access key and an s3:* policy
    is created in the first (unauthenticated) requests, then every request must be signed with
    that key. Creates the bucket ``S3_BUCKET``; yields the environment that points a process at it
    (also set in this process while the session lasts)."""
    pytest.importorskip("s3fs")
    moto_server = pytest.importorskip("moto.server")
    import boto3

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        endpoint = "http://127.0.0.1:%d" % server.get_host_and_port()[1]
        _post(endpoint + "/moto-api/reset-auth", b"3")  # three requests without a signature, then IAM
        iam = boto3.client("iam", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id="setup", aws_secret_access_key="setup")
        iam.create_user(UserName="dhkd")
        policy = {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}]}
        iam.put_user_policy(UserName="dhkd", PolicyName="s3", PolicyDocument=json.dumps(policy))
        key = iam.create_access_key(UserName="dhkd")["AccessKey"]
        env = {"AWS_ENDPOINT_URL_S3": endpoint, "AWS_ACCESS_KEY_ID": key["AccessKeyId"], "AWS_SECRET_ACCESS_KEY": key["SecretAccessKey"],
               "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}
        boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id=key["AccessKeyId"],
                     aws_secret_access_key=key["SecretAccessKey"]).create_bucket(Bucket=S3_BUCKET)
        with pytest.MonkeyPatch.context() as mp_env:
            for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL"):
                mp_env.delenv(name, raising=False)
            for name, value in env.items():
                mp_env.setenv(name, value)
            yield env
    finally:
        try:
            _post("http://127.0.0.1:%d/moto-api/reset-auth" % server.get_host_and_port()[1], b"inf")
        finally:
            server.stop()
